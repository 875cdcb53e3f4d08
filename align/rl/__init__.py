"""RL math for align: losses, advantages, KL estimators and controllers (pure torch)."""

from align.rl.functional import *  # noqa: F403 - the public names are functional's own __all__
from align.rl.functional import __all__ as __all__

"""align: the whole alignment pipeline from one YAML recipe."""

__version__ = "0.1.0"

"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill) and SIGINT (Ctrl-C) ask the
running stage to stop at its next step boundary, after a checkpoint. A second Ctrl-C stops at once;
a repeated SIGTERM is ignored (launchers pass the first one on to every rank, and torch's elastic
agent sends its own: the stage must not lose its checkpoint to the echo).

A stage's loop calls `stop_requested()` at each step boundary (TRL stages through a callback, PPO and
the generation stages in their own loops) and, having checkpointed, raises `Interrupted`; the runner
then marks the stage `interrupted`, and `align run` again resumes it from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger("align")

_requested = threading.Event()
_signal_name: list[str] = []


class Interrupted(Exception):  # noqa: N818 - it is an event, not an error
    """The stage stopped early because a signal asked it to; its last checkpoint is complete."""


def stop_requested() -> bool:
    return _requested.is_set()


def stop_agreed() -> bool:
    """`stop_requested()`, agreed across the ranks of a distributed run (one all-reduce): a signal
    reaches the ranks at slightly different moments, and a rank that checkpoints and stops while
    the others take another step would hang them all in their next collective. Call it at the same
    point of every step on every rank."""
    import torch
    import torch.distributed as dist

    requested = stop_requested()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1.0 if requested else 0.0], device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not requested:
        request_stop("a signal to another rank")
    return bool(flag.item())


def request_stop(name: str = "request") -> None:
    """Ask the running stage to stop at its next step boundary (what the signal handler does)."""
    if not _requested.is_set():
        _signal_name[:] = [name]
        _requested.set()


def signal_name() -> str:
    return _signal_name[0] if _signal_name else "a signal"


#: Exit status of a stage process that stopped on request, its checkpoint complete (EX_TEMPFAIL).
EXIT_INTERRUPTED = 75


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _requested.is_set():
        if signum == signal.SIGINT:  # Ctrl-C twice: do not wait for the step to end
            logger.warning("SIGINT again: stopping now, without a checkpoint")
            os._exit(128 + signum)
        return
    logger.warning("%s: checkpointing at the next step boundary, then stopping%s", name,
                   " (Ctrl-C again to stop now)" if signum == signal.SIGINT else "")
    request_stop(name)


_depth = [0]


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT request a stop instead of killing the process. Re-entrant:
    the outermost block (the runner's, or a stage process's) installs the handlers and forgets the
    request when it ends. Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or _depth[0]:
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()
        _signal_name.clear()

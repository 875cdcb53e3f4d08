"""Signals ask for a stop at the next step boundary; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from align import preempt


def test_sigterm_and_sigint_request_a_stop_and_an_echoed_sigterm_is_ignored() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        with preempt.stop_on_signals():
            assert not preempt.stop_requested()
            os.kill(os.getpid(), sig)
            assert preempt.stop_requested() and preempt.signal_name() == sig.name
            if sig == signal.SIGTERM:
                os.kill(os.getpid(), sig)  # the launcher's copy of the same SIGTERM: still alive
            with preempt.stop_on_signals():  # nested (a stage inside the runner): the same request
                assert preempt.stop_requested()
        assert not preempt.stop_requested()  # forgotten when the outermost block ends
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_stop_agreed_in_one_process_is_the_local_request() -> None:
    with preempt.stop_on_signals():
        assert not preempt.stop_agreed()
        preempt.request_stop("test")
        assert preempt.stop_agreed()


def test_ctrl_c_twice_stops_at_once() -> None:
    code = textwrap.dedent("""
        import os, signal, time
        from align.preempt import stop_on_signals
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGINT
    assert "not reached" not in done.stdout

"""Stop signals as exceptions: what is held, and what the process was told to ignore stays ignored."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from server.termination import STOP_SIGNALS, Terminated, stop_signals_held, stop_signals_raise


@pytest.fixture(autouse=True)
def _default_stop_signals() -> Iterator[None]:
    """Start from the dispositions of a process started in a terminal: under ``nohup`` (SIGHUP
    ignored) or as a shell's background job (SIGINT ignored) the runner would hand these tests an
    ignored signal, which the code under test rightly leaves ignored."""
    defaults = {signal.SIGINT: signal.default_int_handler}
    previous = {sig: signal.signal(sig, defaults.get(sig, signal.SIG_DFL)) for sig in STOP_SIGNALS}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


def test_a_signal_while_held_is_raised_after_the_block() -> None:
    done = []
    with pytest.raises(Terminated) as stop:
        with stop_signals_raise():
            with stop_signals_held():
                _deliver(signal.SIGHUP)
                done.append("cleanup finished")
    assert done == ["cleanup finished"]
    assert (stop.value.name, stop.value.exit_code) == ("SIGHUP", 129)
    # the process is on its way out: a repeat is ignored, not raised in the middle of the exit
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_nohup_stays_in_force() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what `nohup fedsynth simulate ...` sets up
    try:
        with stop_signals_raise():
            _deliver(signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_handlers_are_restored_after_a_normal_exit() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    with stop_signals_raise():
        with stop_signals_held():
            pass
    assert {sig: signal.getsignal(sig) for sig in before} == before

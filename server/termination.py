"""Stop signals (SIGTERM, SIGINT, SIGHUP) as an exception, so cleanup code always runs.

Python ends the process at once on SIGTERM and SIGHUP, skipping every ``finally``: the
SuperLink of a local simulation runs in a session of its own, so it, its SuperExec and
Ray's workers would outlive ``fedsynth``. Raised as :class:`Terminated` instead, the signal
unwinds the stack and the code that started processes stops them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A stop signal arrived. A ``KeyboardInterrupt``: no ``except Exception`` on the way takes
    it for an ordinary error and carries on, and code that already handles Ctrl-C (``fedsynth
    run`` stops its remote run) handles SIGTERM and SIGHUP the same way."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


def _in_main_thread() -> bool:
    # Python only lets the main thread set handlers (and only runs them there).
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, the first stop signal raises :class:`Terminated` in the main thread.

    Later ones are ignored from then on, also after the block: the process is on its way
    out, and a repeated Ctrl-C or ``kill`` must neither cut the cleanup short nor turn the
    exit into a kill by signal.
    """
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        _ignore_stop_signals()
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _not_ignored()}
    try:
        yield
    except Terminated:
        raise  # keep ignoring: see above
    except BaseException:
        _restore(previous)
        raise
    else:
        _restore(previous)


def _not_ignored() -> list[signal.Signals]:
    """The stop signals not ignored already: ``nohup`` ignores SIGHUP, a shell ignores SIGINT
    in a background job, and that choice stays."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _restore(handlers: dict[signal.Signals, object]) -> None:
    for sig, old in handlers.items():
        signal.signal(sig, old)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Within the block, stop signals are noted, not acted on; the first is raised after the block.

    For cleanup that must run to its end: cut short by a second signal, stopping a
    process tree would leave part of it running.
    """
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in _not_ignored()}
    try:
        yield
    finally:
        _restore(previous)
    if caught:
        _ignore_stop_signals()  # as after a signal raised by stop_signals_raise
        raise Terminated(caught[0])

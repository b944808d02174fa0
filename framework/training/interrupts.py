"""Ctrl-C during training: stop where the run's state is consistent, then save it.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, and most of a
training step is not a place to save from: the noise and timesteps of the next batch may
already be drawn from the run's generator, the optimizer may have updated some
parameters and not others, or all of them but the step count not yet. A state saved
there resumes into a different run.

While :class:`StopAtStepBoundary` is active, the first SIGINT only sets
:attr:`~StopAtStepBoundary.requested`; the loop checks it after each optimizer step (the
one place where weights, optimizer, schedule, generators and the batch position all
belong to the same step), saves there and raises ``KeyboardInterrupt`` itself. A second
SIGINT raises ``KeyboardInterrupt`` at once, wherever the loop is; the loop then saves
nothing (the newest state already on disk, if any, is what a resumed run continues from).

The handler is only installed on the main thread (Python runs signal handlers nowhere
else), when SIGINT is not ignored (a background job), and by single-process runs: the
processes of a multi-GPU run would each stop after a step of their own.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any

NOTICE = "Ctrl-C: stopping after this step to save resumable state (press Ctrl-C again to stop at once, without saving)"


class StopAtStepBoundary:
    """A context manager: SIGINT sets :attr:`requested` instead of raising (the first time)."""

    def __init__(self, *, enabled: bool = True, notice: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled
        self.notice = notice
        #: a Ctrl-C arrived; the loop stops at its next step boundary
        self.requested = False
        #: a second Ctrl-C arrived and raised KeyboardInterrupt where the loop was
        self.forced = False
        self._previous: Any = None
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    def __enter__(self) -> StopAtStepBoundary:
        if self.enabled and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            # None: a handler not set from Python, which could not be put back
            if previous is not None and previous != signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        if self.notice is not None:
            # the handler runs between two bytecodes of the main thread, possibly inside a
            # write to the same stream: a message that cannot be written now is left out
            with contextlib.suppress(Exception):
                self.notice(NOTICE)

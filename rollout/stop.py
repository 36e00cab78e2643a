"""SIGINT/SIGTERM during training: finish the step in hand, write a checkpoint, then stop.

:class:`StopSignals` replaces the two handlers while training runs (main thread only; elsewhere
it changes nothing) and records the first signal.  The driver polls :attr:`StopSignals.signum`
between steps and while it waits for groups.  A second signal gets the previous handler, so
an impatient Ctrl-C still ends the process at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: ``signum`` is the first SIGINT/SIGTERM received inside it, else None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal refuses other threads
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after the current step with a checkpoint "
              "(send it again to stop at once)", flush=True)  # fmt: skip
        previous = self._previous.get(signum)
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)

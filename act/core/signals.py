"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (`kill`, a batch scheduler's time limit).

Inside `StopSignals()` the first signal only sets a flag: the training loop finishes the step it is in, writes
last.pt and exits with 130 (SIGINT) or 143 (SIGTERM), printing the command that resumes the run. A second signal
stops at once (KeyboardInterrupt / the default SIGTERM action); the last complete checkpoint is still intact because
every checkpoint is written atomically.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """Context manager: `with StopSignals() as stop: ... if stop.requested: ...`."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 128 + int(self.received or 0))

    def _handler(self, signum, frame):
        if self.received is not None:  # second signal: stop now
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"\nact: {signal.Signals(signum).name} received: finishing this step and saving last.pt "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                try:
                    self._previous[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):  # not allowed here (e.g. embedded interpreter)
                    pass
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


def worker_ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C (SIGINT) reaches the whole foreground process group, and `timeout`, Slurm
    and friends send SIGTERM to the whole group too. The workers keep serving while the main process finishes its
    step and saves, then it shuts them down (and a worker whose main process died exits on its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

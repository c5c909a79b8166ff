"""How a run stops on request: SIGTERM (preemption, `ray job stop`) and a first Ctrl-C
(SIGINT) end it after the current step, with a checkpoint; a second Ctrl-C stops at once
(KeyboardInterrupt, nothing saved). Ray's own processes block SIGINT, so a Ctrl-C in the
terminal reaches only the driver."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class StopSignals:
    """``name``: the signal that asked the run to stop ("SIGTERM", "SIGINT"), or None."""

    def __init__(self) -> None:
        self.name: str | None = None

    def catch(self) -> Callable[[], object]:
        """Install the handlers; returns the call that puts the previous ones back. Only the
        main thread can install handlers; elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, frame):
            if signum == signal.SIGINT and self.name == "SIGINT":
                raise KeyboardInterrupt
            if self.name is None:
                again = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
                print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint{again}",
                      file=sys.stderr, flush=True)
            self.name = signal.Signals(signum).name

        signals = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a job started with Ctrl-C ignored keeps it so
            signals.append(signal.SIGINT)
        previous = {signum: signal.signal(signum, on_signal) for signum in signals}
        return lambda: [signal.signal(signum, handler) for signum, handler in previous.items()]

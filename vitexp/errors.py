"""The exceptions the CLI turns into one line and an exit code, so users never see a
traceback for a mistake they can fix or an interruption they asked for:

- UserError: bad input (exit 2); the message names the problem and the fix.
- StudyFailed: every trial of a run failed (exit 1); the log has the tracebacks.
- Interrupted: SIGINT (exit 130) or SIGTERM (exit 143); finished work is kept and a
  rerun of the same command resumes.
"""

import contextlib
import difflib
import signal
import threading


class UserError(Exception):
    """Bad input. The message names the problem and the fix, on one line."""


class StudyFailed(Exception):
    """Every trial this run tried failed."""


class Interrupted(BaseException):
    """A signal asked this process to stop (BaseException, like KeyboardInterrupt: no
    `except Exception` on the way up may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def unknown(kind: str, name: str, choices) -> UserError:
    """A UserError for an unknown name, listing the closest valid ones."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.4)
    hint = f"closest: {', '.join(close)}" if close else f"choose from: {', '.join(choices)}"
    return UserError(f"unknown {kind} '{name}'; {hint}")


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Interrupted in the main thread (restored on exit)."""
    def stop(signum, _frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

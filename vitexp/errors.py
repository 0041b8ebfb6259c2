"""The one exception type for bad input: the CLI prints its message as one line
and exits 2, so users never see a traceback for a mistake they can fix."""

import difflib


class UserError(Exception):
    """Bad input. The message names the problem and the fix, on one line."""


def unknown(kind: str, name: str, choices) -> UserError:
    """A UserError for an unknown name, listing the closest valid ones."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.4)
    hint = f"closest: {', '.join(close)}" if close else f"choose from: {', '.join(choices)}"
    return UserError(f"unknown {kind} '{name}'; {hint}")

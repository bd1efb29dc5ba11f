"""The one exception type the user sees, and how the command line prints it.

Anything the user can fix (a bad key in params.yaml, a missing file, no network) raises
`UserError` with a single line that names the key, file or value and what is allowed. The CLI
prints that line and exits with status 2; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message is one line, printed without a traceback."""

    def __init__(self, message: str):
        # Collapse whitespace so a message built from several parts stays on one line.
        super().__init__(" ".join(str(message).split()))


class NonFiniteMetricError(UserError):
    """A metric came out NaN or infinite where the definitions say it must be finite."""

"""The one exception type for mistakes a user can fix.

A bad path, a config typo, a corrupt image or a malformed label line raises :class:`UserError`
with a message that names the file, line or key and what would fix it. The command-line entry
points catch it, print the message and exit with status 2 (no traceback unless ``--debug``).
It lives in ``data/`` because that is the lowest room: every other package may import it.
"""

from __future__ import annotations

__all__ = ["UserError", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input; the message says where it is and how to fix it."""

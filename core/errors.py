"""The one exception type for mistakes a user can fix.

A bad path, a config typo, a corrupt image or a malformed label line raises :class:`UserError`
with a message that names the file, line or key and what would fix it. The command-line entry
points catch it, print the message and exit with status 2 (no traceback unless ``--debug``).
It lives in ``core/``, the project's plumbing, which every other package may import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["UserError", "EXIT_USER_ERROR", "run_cli"]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input; the message says where it is and how to fix it."""


def run_cli(body: Callable[[], int | None], *, debug: bool, io_hint: str = "free disk space or fix the path",
            on_interrupt: str = "interrupted") -> int:
    """Run a command's body as every entry point of the project does: a :class:`UserError`, or a
    file that cannot be read or written (a full disk, a missing folder), becomes one line on
    stderr and exit status 2; the traceback only with ``debug``. Ctrl-C exits 130."""
    try:
        return body() or 0
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if debug:
            raise
        where = f"'{exc.filename}': " if exc.filename else ""
        print(f"error: cannot read or write {where}{exc.strerror or exc}; {io_hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        return 130

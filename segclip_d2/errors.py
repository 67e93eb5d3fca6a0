"""One error contract for every entry point (train_net.py, demo/demo.py, datasets/, tools/).

A *user error* (bad argument, config file, key or value, unknown dataset, missing or corrupt
file, unwritable output) is raised as :class:`UserError`. :func:`run_main` turns it into one line

    error: <file or key>: <what is wrong>; <what to do>

on stderr and exit status 2, with no traceback unless ``--debug`` is on the command line or
``SEGCLIP_DEBUG=1`` is set. Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix. ``where`` is the file or config key, ``what`` the problem,
    ``fix`` what to do about it (optional)."""

    def __init__(self, where: str, what: str, fix: str | None = None):
        self.where, self.what, self.fix = str(where), str(what), fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text}; {self.fix}" if self.fix else text


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("SEGCLIP_DEBUG", "") not in ("", "0")


def report(err: UserError, argv: Sequence[str] | None = None) -> int:
    """Print ``err`` as the one-line contract (plus its traceback under debug); return 2."""
    if debug_enabled(argv):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"error: {err.line()}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def run_main(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and apply the contract; returns the process exit status."""
    try:
        rc = main(argv) if argv is not None else main()
    except UserError as err:
        return report(err, argv)
    return int(rc or 0)

"""The errors a user can cause and fix (bad input, a missing base, a corrupt file), told apart from bugs.

Console scripts print these as one line and exit 2 (:func:`brushnet.console.run_console`); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class BrushNetError(Exception):
    """Base of this project's expected errors; the message names the file/key/value and what was expected."""


# What a console script reports as one line: our own errors, the ValueErrors our argument and config
# checks raise, and OSErrors (missing files, full disks, unreachable hubs), which name their path.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (BrushNetError, ValueError, OSError)

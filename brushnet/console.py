"""What the console scripts (``brushnet``, ``brushnet-train``, ``brushnet-data``) share: exit codes,
one-line errors, ``--debug``, and keeping bitsandbytes out of commands that do not use it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from brushnet.errors import EXPECTED_ERRORS

DEBUG_FLAG = "--debug"
DEBUG_ENV = "BRUSHNET_DEBUG"
USAGE_ERROR = 2  # argparse's status for a bad command line; expected errors use it too
EXIT_STATUS_HELP = (
    f"Exit status: 0 done; {USAGE_ERROR} bad input (a command line, config, file or model that does not "
    f"work: one line on stderr, {DEBUG_FLAG} anywhere or {DEBUG_ENV}=1 for the traceback); 1 a bug (traceback)."
)


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type name when the message is empty)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def run_console(
    prog: str,
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]``) and return its exit status (``None`` is 0).

    An expected error (:data:`brushnet.errors.EXPECTED_ERRORS` + ``expected``) prints ``<prog>: error:
    <message>`` as one line on stderr and returns 2; other exceptions are bugs and propagate with their
    traceback. ``--debug`` anywhere on the command line (removed before ``main`` sees it) or
    ``BRUSHNET_DEBUG=1`` lets expected errors propagate too."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        return main(args) or 0
    except (*EXPECTED_ERRORS, *expected) as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)} ({DEBUG_FLAG} for the traceback)", file=sys.stderr, flush=True)
        return USAGE_ERROR


def keep_bitsandbytes_lazy() -> None:
    """Stop diffusers from importing bitsandbytes with its models (only for its bnb quantizer, which this
    project never uses); ``train.optim`` imports it for 8-bit Adam. Importing bitsandbytes costs ~0.8 s and
    prints "Failed to load CPU gemm_4bit_forward ..." on CPUs with AVX512-BF16. Call before
    ``diffusers.models`` is imported; afterwards it changes nothing."""
    import diffusers.utils.import_utils as diffusers_imports

    # diffusers decides once, in this module global, whether bitsandbytes is installed
    # (diffusers/utils/import_utils.py: _bitsandbytes_available; read by is_bitsandbytes_available()).
    if "diffusers.models" not in sys.modules and hasattr(diffusers_imports, "_bitsandbytes_available"):
        diffusers_imports._bitsandbytes_available = False

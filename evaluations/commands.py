"""What evaluator.py and make_reference.py share: how a failure is reported, and checked flags.

evaluations/ stands alone, so it keeps this small copy of the repository's error surface: an
expected failure prints one line, `PROGRAM: error: MESSAGE`, and exits 1 (--debug shows its
traceback first); a bad flag exits 2 (argparse's code), Ctrl-C 130. Anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class ReportedError(Exception):
    """An expected failure, reported by its message alone: what is wrong, which file, what to do."""

    exit_code = EXIT_ERROR


class InputError(ReportedError, ValueError):
    """An input file (missing key, wrong shape or dtype, non-finite values) that cannot be used."""


class Unavailable(ReportedError, RuntimeError):
    """Weights or a device that this machine does not have."""


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run a command's `main`, report an expected failure (or an OSError, e.g. a missing file) in
    one line, and exit with its code; 0 when `main` returns."""
    program = os.path.basename(sys.argv[0])
    try:
        main()
    except (ReportedError, OSError) as err:
        if "--debug" in sys.argv[1:]:
            traceback.print_exc()
        print(f"{program}: error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", EXIT_ERROR))
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an expected failure too"
    )


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum`, else a usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)

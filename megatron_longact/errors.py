"""One error path for every command-line entry point: a foreseeable failure (bad config value,
missing or malformed file, damaged checkpoint) leaves as one line on stderr and exit code 2, never
as a traceback. Bugs still raise.

``UsageError`` is for checks that are not config values (files, records, checkpoints); the other
foreseeable types below are raised by the modules that read user input and already name the field,
file or record.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys


class UsageError(ValueError):
    """Bad input a user can fix: the message names the field, file or record and what is expected."""


def foreseeable_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input rather than a bug."""
    from megatron_longact.checkpoint import CheckpointError
    from megatron_longact.config import ConfigError
    from megatron_longact.data.jsonl import RecordError

    types: list[type[BaseException]] = [UsageError, ConfigError, CheckpointError, RecordError,
                                        FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                        PermissionError, UnicodeDecodeError]
    try:
        # Derives from BaseException: an `except Exception` wrapper never sees it.
        from torch.distributed.checkpoint.api import CheckpointException

        types.append(CheckpointException)
    except ImportError:  # pragma: no cover - torch without distributed checkpointing
        pass
    return tuple(types)


def one_line(exc: BaseException) -> str:
    """The exception as one line (newlines folded, very long messages cut)."""
    if isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    elif isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc.strerror or ""):
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:597] + "..."


def report(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
    return 2


def cli_entry(prog: str):
    """Decorate a CLI ``main(argv) -> int``: foreseeable errors become one line and exit code 2."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except foreseeable_errors() as exc:
                return report(prog, exc)

        return run

    return wrap


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad option raises UsageError (exit 2 through
    :func:`cli_entry`) instead of printing the usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def finite_float(text: str) -> float:
    """argparse type: a finite number (``float`` alone accepts nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a finite number")
    return value


def at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"got {value}, expected an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse

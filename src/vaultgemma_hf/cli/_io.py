"""Small helpers shared by the sub-commands: the usage error, number flags and atomic text output."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


class UsageError(ValueError):
    """A user mistake: printed without a traceback, exit code 2."""


def positive_int(text: str) -> int:
    """argparse type: parses '1000000', '1_000_000' or '1e6' (must be a whole number >= 1)."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(value)


def positive_float(text: str) -> float:
    """Parses a finite number > 0 (underscores allowed)."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike | None) -> Iterator[TextIO]:
    """Yields a text stream: stdout when `path` is None or "-", else a temp file renamed onto `path` on success.

    On any exception the temp file is removed, so a failed command leaves nothing partial at `path`. A path that
    exists and is not a regular file (`/dev/stdout`, a named pipe) is written to directly: renaming onto it would
    replace the device node or pipe instead of writing through it.
    """
    if path is None or str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"output path {target} is a directory; give a file path")
    if target.exists() and not target.is_file():
        with open(target, "w", encoding="utf-8") as stream:
            yield stream
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

"""Small helpers shared by the sub-commands: the usage error, number flags and atomic text output."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from vaultgemma_hf.atomic_files import atomic_stream


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


def boolean(text: str) -> bool:
    """argparse type for a true/false value (`--cross-document-boundaries false`), parsed as `train` parses it.

    `train`'s flags come from `HfArgumentParser`, whose bool type is transformers' `string_to_bool`; the same function
    serves here (imported when a value is parsed, so `--help` does not load transformers).
    """
    from transformers.hf_argparser import string_to_bool

    return string_to_bool(text)


TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short -> torch name
SHORT_DTYPE_NAMES = {torch_name: short for short, torch_name in TORCH_DTYPE_NAMES.items()}


def dtype_name(aliases: dict[str, str]) -> Callable[[str], str]:
    """argparse type for `--dtype`: maps the other spelling (`bf16` / `bfloat16`, ...) onto the parser's choices.

    `run` and `audit run` name dtypes as torch does (`bfloat16`), `convert` as the JAX world does (`bf16`); each
    accepts both, so a flag copied from one command to another works.

    Args:
        aliases: The other spelling -> the parser's spelling (`TORCH_DTYPE_NAMES` or `SHORT_DTYPE_NAMES`).

    Returns:
        The conversion function (the parser's `choices` still validate its result).
    """

    def parse(text: str) -> str:
        return aliases.get(text.lower(), text.lower())

    return parse


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike | None) -> Iterator[TextIO]:
    """Yields a text stream: stdout when `path` is None or "-", else a temp file renamed onto `path` on success.

    The file gets the permissions `open(path, "w")` would give it: those of the file it replaces, else 0666 less
    the umask (not the 0600 of the temp file it is written through).

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
    with atomic_stream(target) as stream:
        yield stream

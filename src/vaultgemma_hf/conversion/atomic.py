"""Atomic outputs: everything is written beside the destination and renamed into place at the very end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError


@contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a path (not yet existing) to write a file or a directory to; it becomes `dst` on success.

    The path lives in a private temporary directory next to `dst` (same file system, so the final step is a
    rename). On any exception the temporary directory is removed and nothing appears at `dst`.

    Args:
        dst: Final location (file or directory).
        overwrite: Replace an existing `dst` (it is only removed once the new output is complete).

    Raises:
        ConversionError: `dst` exists and `overwrite` is False, checked on entry and again just before the final
            rename (a `dst` created by someone else during the conversion is left untouched).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    work = staging / dst.name
    try:
        yield work
        if not work.exists():
            raise ConversionError(f"internal error: nothing was written for {dst}")
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                # Something appeared at `dst` while we were converting: it is not ours to replace.
                raise ConversionError(
                    f"{dst} appeared while converting; it was left as is and nothing was written (pass --overwrite "
                    "to replace it)"
                )
            old = staging / (dst.name + ".old")
            os.rename(dst, old)
            os.rename(work, dst)
        else:
            os.rename(work, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

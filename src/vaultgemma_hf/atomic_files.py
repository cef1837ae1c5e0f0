"""Atomic file writes: a temporary file beside the target, renamed onto it only once it is complete.

Every file the package writes (model cards, ``dp_state.json``, plans, canary files, CLI outputs) goes through
:func:`atomic_stream`, so a failed or interrupted command never leaves a partial file behind. The result gets the
permissions a plain ``open(path, "w")`` would give it (those of the file it replaces, else 0666 less the umask),
not the 0600 of the temporary file, unless a ``mode`` is asked for (the canary file is private: it holds the
audit's secret coins). Directories are written atomically by :mod:`vaultgemma_hf.conversion.atomic`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_stream", "atomic_write_bytes", "atomic_write_text", "default_file_mode"]


def default_file_mode(target: str | os.PathLike) -> int:
    """The permission bits `open(target, "w")` would leave: the existing file's, else 0o666 less the umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)  # the only portable way to read it: set it and restore it at once
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_stream(path: str | os.PathLike, binary: bool = False, mode: int | None = None) -> Iterator[IO]:
    """Yields a stream to a temporary file beside `path`, renamed onto `path` when the block ends without error.

    Args:
        path: The file to write; its directory is created if missing.
        binary: Yield a binary stream instead of a UTF-8 text stream.
        mode: Permission bits of the result (default: :func:`default_file_mode`).

    Raises:
        IsADirectoryError: `path` is a directory.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"output path {target} is a directory; give a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, default_file_mode(target) if mode is None else mode)  # mkstemp made it 0600
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Writes `text` (UTF-8) to `path` atomically; see :func:`atomic_stream`."""
    with atomic_stream(path, mode=mode) as stream:
        stream.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Writes `data` to `path` atomically; see :func:`atomic_stream`."""
    with atomic_stream(path, binary=True, mode=mode) as stream:
        stream.write(data)

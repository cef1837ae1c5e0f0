"""Reading training documents from the two file formats the package takes (`.txt`, `.jsonl`).

One function serves `vaultgemma-hf train`, `plan --dataset`, `audit run` and the examples, so that the documents,
and therefore the packed sequences and N, are the same everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_documents"]


def read_documents(
    path: str | os.PathLike, text_field: str = "text", user_field: str | None = None
) -> tuple[list[str], list[Any] | None]:
    """Reads the documents (and their user ids) of a `.txt` or `.jsonl` file.

    `.txt`: one document per non-blank line, stripped of surrounding whitespace. `.jsonl`: one JSON object per
    non-blank line, its text under `text_field`. Both are read as UTF-8 (a leading byte order mark is ignored) with
    Python's universal newlines (`\\n`, `\\r\\n`, `\\r`).

    Args:
        path: The file.
        text_field: The key of the document text in `.jsonl` records.
        user_field: The key of the user id in `.jsonl` records (user-level DP); None: no user ids.

    Returns:
        The documents in file order, and their user ids (None without `user_field`).

    Raises:
        ValueError: The file is missing, of another type, empty, not UTF-8, or a record is malformed (the message
            names the file and line).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"Data file {str(path)!r} does not exist.")
    if file.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"Unsupported data file type {file.suffix!r} ({path}): use .jsonl or .txt.")
    if user_field and file.suffix != ".jsonl":
        raise ValueError(f"User ids ({user_field!r}) need a .jsonl data file, not {path}.")
    documents: list[str] = []
    users: list[Any] | None = [] if user_field else None
    with file.open("rb") as handle:  # decoded line by line, so that an encoding error names its line
        for line_no, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: not valid UTF-8 ({err.reason}); save the file as UTF-8."
                ) from None
            for part in line.replace("\r\n", "\n").replace("\r", "\n").split("\n"):  # universal newlines
                if not part.strip():
                    continue
                if file.suffix == ".txt":
                    documents.append(part.strip())
                    continue
                try:
                    record = json.loads(part)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from err
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{line_no}: record has no {text_field!r} field.")
                if not isinstance(record[text_field], str):  # str(None) would train on the text "None"
                    kind = type(record[text_field]).__name__
                    raise ValueError(f"{path}:{line_no}: the {text_field!r} field is a {kind}, not a string.")
                documents.append(record[text_field])
                if users is not None:
                    if user_field not in record:
                        raise ValueError(f"{path}:{line_no}: record has no {user_field!r} field.")
                    users.append(record[user_field])
    if not documents:
        raise ValueError(f"Data file {str(path)!r} contains no documents.")
    return documents, users

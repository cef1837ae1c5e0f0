"""`vaultgemma-hf run`'s input: prompts read lazily from lines or JSON Lines, grouped into batches."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ._io import UsageError


def read_prompts(stream: Iterable[str] | Iterable[bytes], input_format: str = "auto") -> Iterator[str | None]:
    """Yields the prompts of `stream` lazily, each as soon as its line has been read.

    Args:
        stream: Lines of text or of UTF-8 bytes (a file or stdin).
        input_format: "lines", "jsonl" or "auto", as for `read_numbered_prompts`.

    Yields:
        One prompt per line (None for a blank line in line mode), as `read_numbered_prompts` without line numbers.

    Raises:
        UsageError: A JSON line is invalid or has no string "text"/"prompt" field (raised when that line is reached).
    """
    for _, prompt in read_numbered_prompts(stream, input_format):
        yield prompt


def read_numbered_prompts(
    stream: Iterable[str] | Iterable[bytes], input_format: str = "auto", text_field: str | None = None
) -> Iterator[tuple[int, str | None]]:
    """Yields the prompts of `stream` with their line numbers, lazily, each as soon as its line has been read.

    Args:
        stream: Lines of text, or lines of bytes decoded as UTF-8 (a file or stdin read in binary mode, so that
            a decoding error names its line). A byte order mark at the start is ignored.
        input_format: "lines" (one prompt per line), "jsonl" (the "text" or "prompt" field of each JSON line) or
            "auto" (jsonl when the first non-blank line starts with "{", else lines).
        text_field: The key of the prompt in JSON lines; None: "text", else "prompt".

    Yields:
        (line number, prompt), one per line, numbered from 1. In line mode a blank (whitespace-only) line yields
        None as its prompt, so that results stay aligned with input lines; in jsonl mode blank lines are skipped.

    Raises:
        UsageError: A line is not valid UTF-8, or a JSON line is invalid, not an object or has no string prompt
            field (raised when that line is reached).
    """
    fields = ("text", "prompt") if text_field is None else (text_field,)
    wanted = " or ".join(json.dumps(field) for field in fields)
    mode = input_format
    hint = " (the first line looked like JSON; give --input-format lines for plain text)" if mode == "auto" else ""
    leading_blanks = 0  # blank lines seen while the format is still undecided
    for number, raw in enumerate(stream, start=1):
        line = _decode_line(raw, number).rstrip("\r\n")
        if number == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark (files saved by Excel, Notepad, ...)
        if not line.strip():
            if mode == "lines":
                yield number, None
            elif mode == "auto":
                leading_blanks += 1
            continue
        if mode == "auto":
            mode = "jsonl" if line.lstrip().startswith("{") else "lines"
            if mode == "lines":  # the blank lines so far were lines 1 to leading_blanks
                yield from ((blank, None) for blank in range(1, leading_blanks + 1))
        if mode == "lines":
            yield number, line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"input line {number} is not valid JSON: {err}{hint}") from None
        if not isinstance(record, dict):
            raise UsageError(f"input line {number} is not a JSON object{hint}")
        text = next((record[field] for field in fields if field in record), None)
        if not isinstance(text, str):
            keys = ", ".join(map(str, record)) or "none"
            raise UsageError(
                f"input line {number} has no string {wanted} field (its keys: {keys}); give --text-field KEY"
            )
        yield number, text


def _decode_line(raw: str | bytes, number: int) -> str:
    """Decodes one input line read in binary mode as UTF-8 (a text line is returned as it is).

    Raises:
        UsageError: The line is not valid UTF-8, naming its line number and the offending byte.
    """
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"input line {number} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at position {err.start + 1}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)."
        ) from None


def _batches(items: Iterable[tuple[int, str | None]], batch_size: int) -> Iterator[list[tuple[int, str | None]]]:
    """Groups numbered prompts into batches of `batch_size` prompts, each yielded once full or when the input ends.

    Blank items (prompt None) ride along in order; a blank with no prompt pending is yielded at once.
    """
    pending: list[tuple[int, str | None]] = []
    prompts = 0
    for item in items:
        pending.append(item)
        prompts += item[1] is not None
        if prompts == batch_size or prompts == 0:
            yield pending
            pending, prompts = [], 0
    if pending:
        yield pending


def _count_prompts(path: Path) -> int:
    """Counts the non-blank lines of a file (the prompts it holds), for the progress bar's total."""
    with open(path, encoding="utf-8", errors="replace") as stream:
        return sum(1 for line in stream if line.strip())

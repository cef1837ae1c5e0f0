"""`vaultgemma-hf run`'s input: prompts read lazily from lines or JSON Lines, grouped into batches."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ._io import UsageError


def read_prompts(stream: Iterable[str], input_format: str = "auto") -> Iterator[str | None]:
    """Yields the prompts of `stream` lazily, each as soon as its line has been read.

    Args:
        stream: Lines of text (a file or stdin).
        input_format: "lines", "jsonl" or "auto", as for `read_numbered_prompts`.

    Yields:
        One prompt per line (None for a blank line in line mode), as `read_numbered_prompts` without line numbers.

    Raises:
        UsageError: A JSON line is invalid or has no string "text"/"prompt" field (raised when that line is reached).
    """
    for _, prompt in read_numbered_prompts(stream, input_format):
        yield prompt


def read_numbered_prompts(stream: Iterable[str], input_format: str = "auto") -> Iterator[tuple[int, str | None]]:
    """Yields the prompts of `stream` with their line numbers, lazily, each as soon as its line has been read.

    Args:
        stream: Lines of text (a file or stdin).
        input_format: "lines" (one prompt per line), "jsonl" (the "text" or "prompt" field of each JSON line) or
            "auto" (jsonl when the first non-blank line starts with "{", else lines).

    Yields:
        (line number, prompt), one per line, numbered from 1. In line mode a blank (whitespace-only) line yields
        None as its prompt, so that results stay aligned with input lines; in jsonl mode blank lines are skipped.

    Raises:
        UsageError: A JSON line is invalid or has no string "text"/"prompt" field (raised when that line is reached).
    """
    mode = input_format
    hint = " (the first line looked like JSON; give --input-format lines for plain text)" if mode == "auto" else ""
    leading_blanks = 0  # blank lines seen while the format is still undecided
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip("\r\n")
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
        text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UsageError(f'input line {number} has no string "text" or "prompt" field{hint}')
        yield number, text


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

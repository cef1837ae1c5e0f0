"""Counting the privacy units (packed training sequences) of a dataset file, for the planner's N."""

from __future__ import annotations

import math
import os
from typing import Any


def count_sequences(
    path: str | os.PathLike,
    seq_len: int,
    tokenizer: str | os.PathLike | Any | None = None,
    *,
    text_field: str = "text",
    cross_document_boundaries: bool = True,
    batch_size: int = 1024,
) -> int:
    """Number of training sequences that ``vaultgemma-hf train`` would make of ``path``.

    Documents are read like the trainer does (``.jsonl`` with the text under ``text_field``, or ``.txt`` with one
    document per non-empty line; see `vaultgemma_hf.data.read_documents`).

    - With a tokenizer: the trainer's packing (`vaultgemma_hf.data.pack_documents`) appends an EOS to every
      non-empty document and cuts the concatenated stream into ``seq_len``-token sequences, the last one padded,
      so N = ceil(sum(tokens + 1) / seq_len); with ``cross_document_boundaries=False`` each document is cut on
      its own, so N = sum(ceil((tokens + 1) / seq_len)).
    - Without one: every document counts as one sequence (exact when documents are already packed sequences,
      one per line).

    Args:
        path: ``.jsonl`` or ``.txt`` dataset.
        seq_len: Tokens per sequence.
        tokenizer: A tokenizer directory or ``tokenizer.json`` path, or a loaded transformers tokenizer.
        text_field: Key of the text in ``.jsonl`` records.
        cross_document_boundaries: As the trainer's option of that name (with a tokenizer only).
        batch_size: Documents tokenized per call.

    Raises:
        ValueError: If the file is missing, malformed or empty, or the tokenizer cannot be loaded.
    """
    from vaultgemma_hf.data.documents import read_documents

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"sequence length must be a positive integer, got {seq_len!r}.")
    documents, _ = read_documents(str(path), text_field)
    if tokenizer is None:
        return len(documents)
    tokenizer = _load_tokenizer(tokenizer)
    total = 0
    for start in range(0, len(documents), batch_size):
        ids = tokenizer(documents[start : start + batch_size], add_special_tokens=False)["input_ids"]
        lengths = [len(doc) + 1 for doc in ids if len(doc) > 0]  # + the EOS separator
        total += sum(lengths) if cross_document_boundaries else sum(math.ceil(n / seq_len) for n in lengths)
    if total == 0:
        raise ValueError(f"all documents of {path} are empty after tokenization.")
    return math.ceil(total / seq_len) if cross_document_boundaries else total


def _load_tokenizer(tokenizer: str | os.PathLike | Any) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.fspath(tokenizer)
    try:
        if os.path.isfile(path):
            return PreTrainedTokenizerFast(tokenizer_file=path)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer {path!r}: {err}") from err

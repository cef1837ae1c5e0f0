"""Packing documents into the fixed-length training sequences that DP-SGD protects.

VaultGemma's privacy unit is one packed sequence of 1024 tokens. This module makes that unit explicit for
continued pretraining: documents are tokenized, each one is followed by an EOS separator, and the token stream
is cut into sequences of exactly `seq_len` tokens (the last one padded, padding is never a training target).

Options:

* ``cross_document_boundaries=False``: a sequence never holds tokens of two documents (long documents are split
  over several sequences, short ones are padded); useful when "a sequence" should mean "part of one document".
* ``user_ids``: one id per document; the documents of a user are packed together and never share a sequence
  with another user's, and every sequence remembers its user. [`PackedDataset.groups`] lists the sequences of
  each user for user-level DP (`DPTrainingArguments.privacy_unit="user"`).

The result is a plain `torch.utils.data.Dataset` (no `datasets` dependency) of dicts with ``input_ids``,
``labels`` and ``attention_mask`` (and ``user_id`` when grouped), plus [`DataCollatorForPackedSequences`].
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class PackedDataset(Dataset):
    """Fixed-length token sequences (int32 storage) with their true lengths and optional user ids.

    Args:
        input_ids (`torch.Tensor`): ``[num_sequences, seq_len]`` token ids, padding included.
        lengths (`torch.Tensor`): ``[num_sequences]`` number of real (non-padding) tokens of each sequence.
        user_ids (`Sequence`, *optional*): the user of each sequence.
    """

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, user_ids: Sequence[Any] | None = None):
        if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],):
            raise ValueError("input_ids must be [num_sequences, seq_len] and lengths [num_sequences].")
        if user_ids is not None and len(user_ids) != input_ids.shape[0]:
            raise ValueError(f"{len(user_ids)} user ids for {input_ids.shape[0]} sequences.")
        self.input_ids = input_ids
        self.lengths = lengths
        self.user_ids = list(user_ids) if user_ids is not None else None

    @property
    def seq_len(self) -> int:
        """Length of every sequence (padding included)."""
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.input_ids[index].long()
        mask = (torch.arange(self.seq_len) < self.lengths[index]).long()
        item = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX), "attention_mask": mask}
        if self.user_ids is not None:
            item["user_id"] = self.user_ids[index]
        return item

    def groups(self) -> list[list[int]]:
        """Sequence indices of each user, in order of first appearance (requires `user_ids`)."""
        if self.user_ids is None:
            raise ValueError("This dataset was packed without user ids; there are no user groups.")
        return group_indices_by_user(self.user_ids)

    def sha256(self) -> str:
        """SHA-256 of the token ids (see [`token_ids_sha256`])."""
        return token_ids_sha256(self.input_ids[i, : int(self.lengths[i])] for i in range(len(self)))


class DataCollatorForPackedSequences:
    """Stacks packed examples (dicts of equal-length ``input_ids``/``labels``/``attention_mask``) into a batch.

    Keys other than the three model inputs (e.g. ``user_id``) are dropped.
    """

    keys = ("input_ids", "labels", "attention_mask")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("Cannot collate an empty list of examples.")
        batch = {}
        for key in self.keys:
            if key in features[0]:
                batch[key] = torch.stack([torch.as_tensor(f[key], dtype=torch.long) for f in features])
        return batch


def pack_documents(
    documents: Iterable[str] | Iterable[Sequence[int]],
    tokenizer: Any | None = None,
    *,
    seq_len: int = 1024,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    add_bos: bool = False,
    cross_document_boundaries: bool = True,
    drop_remainder: bool = False,
    user_ids: Sequence[Any] | None = None,
    max_position_embeddings: int | None = None,
) -> PackedDataset:
    """Tokenizes documents, appends an EOS separator to each and packs them into `seq_len`-token sequences.

    Args:
        documents: texts (with `tokenizer`) or already tokenized documents (lists of ids).
        tokenizer: a transformers tokenizer; called with ``add_special_tokens=False``.
        seq_len (`int`): tokens per sequence (VaultGemma: 1024).
        eos_token_id (`int`, *optional*): separator; defaults to the tokenizer's EOS.
        pad_token_id (`int`, *optional*): id used for padding (never a target); defaults to the tokenizer's pad
            id, else 0.
        add_bos (`bool`): prepend the tokenizer's BOS to every document.
        cross_document_boundaries (`bool`): when False, no sequence holds tokens of two documents.
        drop_remainder (`bool`): drop a last, partially filled sequence of each stream instead of padding it.
        user_ids (`Sequence`, *optional*): one user id per document; users never share a sequence.
        max_position_embeddings (`int`, *optional*): the model's position limit; `seq_len` may not exceed it.

    Raises:
        ValueError: empty input, `seq_len` above `max_position_embeddings`, missing EOS id, mismatched user ids.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
    check_sequence_length(seq_len, max_position_embeddings)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("An EOS separator id is needed: pass a tokenizer with an eos token, or eos_token_id.")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    bos = None
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("add_bos=True needs a tokenizer with a BOS token.")

    documents = list(documents)
    if not documents:
        raise ValueError("No documents to pack: the training data is empty.")
    if user_ids is not None and len(user_ids) != len(documents):
        raise ValueError(f"{len(user_ids)} user ids given for {len(documents)} documents.")
    token_lists = _tokenize(documents, tokenizer)

    streams: dict[Any, list[list[int]]] = {}
    for doc_index, tokens in enumerate(token_lists):
        if len(tokens) == 0:
            continue
        doc = ([bos] if bos is not None else []) + list(tokens) + [eos_token_id]
        key = user_ids[doc_index] if user_ids is not None else None
        streams.setdefault(key, []).append(doc)
    if not streams:
        raise ValueError("All documents are empty after tokenization: the training data is empty.")

    rows: list[list[int]] = []
    owners: list[Any] = []
    for key, docs in streams.items():
        pieces = [sum(docs, [])] if cross_document_boundaries else docs
        for piece in pieces:
            for start in range(0, len(piece), seq_len):
                chunk = piece[start : start + seq_len]
                if len(chunk) < seq_len and drop_remainder:
                    continue
                rows.append(chunk)
                owners.append(key)
    if not rows:
        raise ValueError(f"No full sequence of {seq_len} tokens could be packed (drop_remainder=True).")

    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.int32)
    lengths = torch.empty(len(rows), dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        lengths[i] = len(row)
    return PackedDataset(input_ids, lengths, owners if user_ids is not None else None)


def _tokenize(documents: list, tokenizer: Any | None) -> list[list[int]]:
    if isinstance(documents[0], str):
        if tokenizer is None:
            raise ValueError("Documents are text: a tokenizer is needed to pack them.")
        return tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [list(map(int, doc)) for doc in documents]


def check_sequence_length(seq_len: int, max_position_embeddings: int | None) -> None:
    """Raises a clear error when sequences are longer than the model's positions."""
    if max_position_embeddings is not None and seq_len > max_position_embeddings:
        raise ValueError(
            f"Sequences of {seq_len} tokens are longer than the model's max_position_embeddings="
            f"{max_position_embeddings}; use seq_len <= {max_position_embeddings}."
        )


def group_indices_by_user(user_ids: Sequence[Any]) -> list[list[int]]:
    """Indices of each distinct user id, users in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for index, user in enumerate(user_ids):
        groups.setdefault(user, []).append(index)
    return list(groups.values())


def token_ids_sha256(sequences: Iterable[Any]) -> str:
    """SHA-256 over the token ids of a sequence of examples, order-sensitive and unambiguous.

    Each example contributes its length (8 bytes, little endian) followed by its ids as little-endian int64.
    Examples may be tensors, lists or dicts with ``input_ids`` (a dict's padding positions, those with
    ``attention_mask == 0``, are excluded).
    """
    hasher = hashlib.sha256()
    for example in sequences:
        if isinstance(example, Mapping):
            ids = torch.as_tensor(example["input_ids"]).flatten()
            if "attention_mask" in example:
                ids = ids[torch.as_tensor(example["attention_mask"]).flatten().bool()]
        else:
            ids = torch.as_tensor(example).flatten()
        array = np.ascontiguousarray(ids.cpu().numpy().astype("<i8"))
        hasher.update(np.int64(array.size).astype("<i8").tobytes())
        hasher.update(array.tobytes())
    return hasher.hexdigest()

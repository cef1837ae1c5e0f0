"""Tests of document packing into fixed-length privacy units."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from vaultgemma_hf.data.packing import (
    IGNORE_INDEX,
    DataCollatorForPackedSequences,
    pack_documents,
    token_ids_sha256,
)


def _rows(dataset):
    return [dataset[i]["input_ids"][: int(dataset[i]["attention_mask"].sum())].tolist() for i in range(len(dataset))]


def test_packs_across_documents_with_eos_separators():
    ds = pack_documents([[5, 6, 7], [8, 9]], seq_len=4, eos_token_id=1, pad_token_id=0)
    assert len(ds) == 2 and ds.seq_len == 4
    assert _rows(ds) == [[5, 6, 7, 1], [8, 9, 1]]
    last = ds[1]
    assert last["input_ids"].tolist() == [8, 9, 1, 0]
    assert last["attention_mask"].tolist() == [1, 1, 1, 0]
    assert last["labels"].tolist() == [8, 9, 1, IGNORE_INDEX]


def test_does_not_cross_document_boundaries_when_asked():
    ds = pack_documents([[5, 6, 7], [8, 9]], seq_len=3, eos_token_id=1, cross_document_boundaries=False)
    assert _rows(ds) == [[5, 6, 7], [1], [8, 9, 1]]
    ds = pack_documents(
        [[5, 6, 7], [8, 9]], seq_len=3, eos_token_id=1, cross_document_boundaries=False, drop_remainder=True
    )
    assert _rows(ds) == [[5, 6, 7], [8, 9, 1]]


def test_user_grouping_never_mixes_users():
    docs = [[10, 11], [20], [12, 13, 14], [21, 22]]
    users = ["a", "b", "a", "b"]
    ds = pack_documents(docs, seq_len=4, eos_token_id=1, user_ids=users)
    assert _rows(ds) == [[10, 11, 1, 12], [13, 14, 1], [20, 1, 21, 22], [1]]
    assert ds.user_ids == ["a", "a", "b", "b"]
    assert ds.groups() == [[0, 1], [2, 3]]
    assert ds[0]["user_id"] == "a"


def test_tokenizer_round_trip(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = ["Patient Sam reported fatigue.", "Account review for Mika: 9 transfers."]
    ds = pack_documents(docs, tok, seq_len=8)
    expected = []
    for doc in docs:  # oracle: the tokenizer directly, plus EOS
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = [t for row in _rows(ds) for t in row]
    assert flat == expected
    assert all(len(r) == 8 for r in _rows(ds)[:-1])


def test_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        pack_documents([], seq_len=4, eos_token_id=1)
    with pytest.raises(ValueError, match="empty"):
        pack_documents([[], []], seq_len=4, eos_token_id=1)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        pack_documents([[1, 2]], seq_len=32, eos_token_id=1, max_position_embeddings=16)
    with pytest.raises(ValueError, match="tokenizer"):
        pack_documents(["text"], seq_len=4, eos_token_id=1)
    with pytest.raises(ValueError, match="EOS"):
        pack_documents([[1, 2]], seq_len=4)
    with pytest.raises(ValueError, match="user ids"):
        pack_documents([[1, 2]], seq_len=4, eos_token_id=1, user_ids=["a", "b"])


def test_sha256_matches_independent_hash_and_detects_changes():
    ds = pack_documents([[5, 6, 7], [8, 9]], seq_len=4, eos_token_id=1)
    oracle = hashlib.sha256()
    for row in ([5, 6, 7, 1], [8, 9, 1]):
        oracle.update(struct.pack("<q", len(row)))
        oracle.update(struct.pack(f"<{len(row)}q", *row))
    assert ds.sha256() == oracle.hexdigest()
    assert token_ids_sha256(ds[i] for i in range(len(ds))) == ds.sha256()
    changed = pack_documents([[5, 6, 7], [8, 3]], seq_len=4, eos_token_id=1)
    assert changed.sha256() != ds.sha256()


def test_collator_stacks_and_drops_extra_keys():
    ds = pack_documents([[5, 6, 7], [8, 9]], seq_len=4, eos_token_id=1, user_ids=["a", "b"])
    batch = DataCollatorForPackedSequences()([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"].dtype == torch.long

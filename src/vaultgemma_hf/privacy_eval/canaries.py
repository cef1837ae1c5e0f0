"""Audit canaries: random token sequences, each included in the training data with a secret coin flip.

The one-run audit of Steinke, Nasr & Jagielski (2023) inserts m canaries into the training set, each
independently with probability 1/2, trains once, and then tries to tell the included canaries from the held-out
ones. For the audit to test the trainer's guarantee, each canary must be exactly one privacy unit: here a canary
is one whole training sequence (never packed together with other text), and under user-level DP its own user.

Canaries are uniformly random token ids (special tokens excluded) behind an optional BOS: the most
out-of-distribution text there is, hence the easiest to memorise and the strongest simple canary for a language
model. The file that lists them holds the inclusion coins, i.e. the audit's secret: keep it away from anyone whose
attack is being evaluated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaultgemma_hf.atomic_files import atomic_write_text
from vaultgemma_hf.data.packing import PackedDataset

__all__ = [
    "CANARY_FILE_FORMAT",
    "Canary",
    "CanarySet",
    "append_canaries",
    "check_canaries_fit",
    "load_canaries",
    "make_canaries",
    "save_canaries",
]

CANARY_FILE_FORMAT = "vaultgemma-hf-canaries/1"


@dataclass(frozen=True)
class Canary:
    """One audit canary.

    Attributes:
        index (`int`): position in its [`CanarySet`].
        token_ids (`tuple[int, ...]`): the canary sequence (BOS included when the set uses one).
        included (`bool`): whether the canary goes into the training data (the secret coin).
    """

    index: int
    token_ids: tuple[int, ...]
    included: bool


@dataclass(frozen=True)
class CanarySet:
    """Canaries plus how they were drawn (so that fresh reference canaries can be drawn the same way).

    Attributes:
        canaries (`tuple[Canary, ...]`): the canaries.
        vocab_size (`int`): token ids are drawn from ``[0, vocab_size)`` ...
        excluded_token_ids (`tuple[int, ...]`): ... minus these (special tokens).
        length (`int`): number of random tokens per canary.
        bos_token_id (`int | None`): prepended to every canary when set.
    """

    canaries: tuple[Canary, ...]
    vocab_size: int
    excluded_token_ids: tuple[int, ...]
    length: int
    bos_token_id: int | None

    @property
    def width(self) -> int:
        """Tokens per canary sequence: the random tokens plus the BOS, if any."""
        return self.length + (self.bos_token_id is not None)

    @property
    def included(self) -> list[Canary]:
        """The canaries that go into the training data."""
        return [c for c in self.canaries if c.included]

    @property
    def held_out(self) -> list[Canary]:
        """The canaries that are kept out of the training data."""
        return [c for c in self.canaries if not c.included]

    def draw_references(self, count: int, seed: int | None = None) -> list[tuple[int, ...]]:
        """Fresh canaries from the same distribution, never trained on (references for exposure)."""
        return [tuple(t) for t in _draw_tokens(self, count, np.random.default_rng(seed))]


def _allowed_tokens(vocab_size: int, excluded: Iterable[int]) -> np.ndarray:
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(sorted(set(excluded)), dtype=np.int64))
    if allowed.size < 2:
        raise ValueError(f"Fewer than 2 token ids left to draw canaries from (vocab_size={vocab_size}).")
    return allowed


def _draw_tokens(spec: CanarySet, count: int, rng: np.random.Generator) -> list[list[int]]:
    allowed = _allowed_tokens(spec.vocab_size, spec.excluded_token_ids)
    body = allowed[rng.integers(0, allowed.size, size=(count, spec.length))]
    prefix = [] if spec.bos_token_id is None else [spec.bos_token_id]
    return [prefix + row.tolist() for row in body]


def make_canaries(
    num_canaries: int,
    vocab_size: int,
    *,
    length: int = 32,
    excluded_token_ids: Sequence[int] = (),
    bos_token_id: int | None = None,
    seed: int | None = None,
) -> CanarySet:
    """Draws random token canaries and their inclusion coins (fair: the one-run bound assumes probability 1/2).

    Args:
        num_canaries (`int`): number of canaries m (the one-run audit needs hundreds to thousands).
        vocab_size (`int`): size of the model's vocabulary.
        length (`int`): random tokens per canary (BOS not counted).
        excluded_token_ids (`Sequence[int]`): ids never drawn (pad, eos, bos, unk, other special tokens).
        bos_token_id (`int`, *optional*): prepended to every canary.
        seed (`int`, *optional*): for reproducible tests; by default the coins and tokens use OS entropy.

    Returns:
        [`CanarySet`]
    """
    if num_canaries < 2:
        raise ValueError(f"num_canaries must be >= 2, got {num_canaries}.")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}.")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")
    if bos_token_id is not None and not 0 <= bos_token_id < vocab_size:
        raise ValueError(f"bos_token_id {bos_token_id} is not a token id of a {vocab_size}-token vocabulary.")
    rng = np.random.default_rng(seed)  # seed=None: 128 bits of fresh OS entropy
    spec = CanarySet((), int(vocab_size), tuple(sorted(set(excluded_token_ids))), int(length), bos_token_id)
    tokens = _draw_tokens(spec, num_canaries, rng)
    coins = rng.integers(0, 2, size=num_canaries).astype(bool)  # independent fair coins
    canaries = tuple(Canary(i, tuple(t), bool(c)) for i, (t, c) in enumerate(zip(tokens, coins, strict=True)))
    return CanarySet(canaries, spec.vocab_size, spec.excluded_token_ids, spec.length, bos_token_id)


def save_canaries(path: str | os.PathLike, canary_set: CanarySet) -> None:
    """Writes the canaries (with their secret coins) as JSON Lines, atomically: a header line, then one per canary.

    The file is readable by its owner only (0600), like a key: anyone who reads the coins can tell which canaries
    were trained on without looking at the model, which would make the audit meaningless.
    """
    header = {
        "format": CANARY_FILE_FORMAT,
        "vocab_size": canary_set.vocab_size,
        "excluded_token_ids": list(canary_set.excluded_token_ids),
        "length": canary_set.length,
        "bos_token_id": canary_set.bos_token_id,
        "num_canaries": len(canary_set.canaries),
    }
    lines = [json.dumps(header)] + [
        json.dumps({"index": c.index, "token_ids": list(c.token_ids), "included": c.included})
        for c in canary_set.canaries
    ]
    atomic_write_text(path, "\n".join(lines) + "\n", mode=0o600)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(path: Path, header: dict[str, Any]) -> None:
    vocab_size, length, bos = header.get("vocab_size"), header.get("length"), header.get("bos_token_id")
    excluded, count = header.get("excluded_token_ids"), header.get("num_canaries")
    problems = []
    if not (_is_int(vocab_size) and vocab_size >= 2):
        problems.append(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not (_is_int(length) and length >= 1):
        problems.append(f"length must be an integer >= 1, got {length!r}")
    if not (bos is None or (_is_int(bos) and 0 <= bos < (vocab_size if _is_int(vocab_size) else bos + 1))):
        problems.append(f"bos_token_id must be null or a token id below vocab_size, got {bos!r}")
    if not (isinstance(excluded, list) and all(_is_int(t) and t >= 0 for t in excluded)):
        problems.append(f"excluded_token_ids must be a list of token ids, got {excluded!r}")
    if not (_is_int(count) and count >= 2):
        problems.append(f"num_canaries must be an integer >= 2, got {count!r}")
    if problems:
        raise ValueError(f"{path}: malformed canary header: " + "; ".join(problems) + ".")


def load_canaries(path: str | os.PathLike) -> CanarySet:
    """Reads a file written by [`save_canaries`]; raises `ValueError` naming the line of any malformed content."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Canary file {str(path)!r} does not exist.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records: list[Any] = []
    for line_no, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from err
    if not records or not isinstance(records[0], dict) or records[0].get("format") != CANARY_FILE_FORMAT:
        raise ValueError(f"{path}: not a canary file (its first line must be a {CANARY_FILE_FORMAT!r} header).")
    header = records[0]
    _check_header(path, header)
    vocab_size, length, bos = header["vocab_size"], header["length"], header["bos_token_id"]
    excluded = set(header["excluded_token_ids"])
    canaries = []
    for line_no, record in enumerate(records[1:], 2):
        ok = isinstance(record, dict) and isinstance(record.get("token_ids"), list)
        ok = ok and isinstance(record.get("included"), bool)
        tokens = record["token_ids"] if ok else []
        prefix = [] if bos is None else [bos]
        body = tokens[len(prefix) :]
        if not ok or not all(_is_int(t) and 0 <= t < vocab_size and t not in excluded for t in body):
            raise ValueError(
                f"{path}:{line_no}: expected token ids in [0, {vocab_size}) outside excluded_token_ids, and a "
                "boolean 'included'."
            )
        if (
            len(tokens) != length + len(prefix)
            or tokens[: len(prefix)] != prefix
            or record.get("index") != line_no - 2
        ):
            raise ValueError(f"{path}:{line_no}: canary length, BOS or index does not match the header.")
        canaries.append(Canary(line_no - 2, tuple(tokens), record["included"]))
    if len(canaries) != header["num_canaries"]:
        raise ValueError(
            f"{path}: the header announces {header['num_canaries']} canaries, the file has {len(canaries)}."
        )
    return CanarySet(tuple(canaries), vocab_size, tuple(sorted(excluded)), length, bos)


def check_canaries_fit(canary_set: CanarySet, vocab_size: int | None = None, seq_len: int | None = None) -> None:
    """Raises `ValueError` when the canaries were drawn for a larger vocabulary than the model's, or are longer
    than the training sequences (`seq_len`)."""
    if vocab_size is not None and canary_set.vocab_size > vocab_size:
        raise ValueError(
            f"The canaries were drawn from {canary_set.vocab_size} token ids but the model's vocabulary has "
            f"{vocab_size}: draw them for this model (vaultgemma-hf audit canaries --tokenizer ...)."
        )
    if seq_len is not None and canary_set.width > seq_len:
        raise ValueError(
            f"Canaries of {canary_set.width} tokens do not fit in training sequences of {seq_len} tokens."
        )


def append_canaries(dataset: PackedDataset, canary_set: CanarySet, pad_token_id: int = 0) -> PackedDataset:
    """Returns `dataset` plus one padded sequence per *included* canary (one privacy unit each).

    With user ids (user-level DP), each canary gets a user of its own (``"canary-<index>"``) so that it is still
    exactly one privacy unit. The held-out canaries are never added.
    """
    included = canary_set.included
    seq_len, width = dataset.seq_len, canary_set.width
    check_canaries_fit(canary_set, seq_len=seq_len)
    if not included:
        return dataset
    extra = torch.full((len(included), seq_len), pad_token_id, dtype=dataset.input_ids.dtype)
    for row, canary in enumerate(included):
        extra[row, :width] = torch.tensor(canary.token_ids, dtype=extra.dtype)
    lengths = torch.cat([dataset.lengths, torch.full((len(included),), width, dtype=dataset.lengths.dtype)])
    user_ids = None
    if dataset.user_ids is not None:
        user_ids = dataset.user_ids + [f"canary-{c.index}" for c in included]
        if len(set(user_ids)) - len(set(dataset.user_ids)) != len(included):
            raise ValueError("A training user id collides with a canary's user id ('canary-<index>').")
    return PackedDataset(torch.cat([dataset.input_ids, extra]), lengths, user_ids)

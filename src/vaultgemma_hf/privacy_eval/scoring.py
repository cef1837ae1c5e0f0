"""Model-facing measurements for audits: per-sequence log-perplexity and greedy continuations.

Works with any causal language model that returns ``.logits`` (ours, transformers' built-in, a PEFT model); no
model class is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vaultgemma_hf.trainer.losses import IGNORE_INDEX, per_example_causal_lm_loss

__all__ = ["greedy_continuations", "sequence_log_perplexity"]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(items: Sequence, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


@torch.no_grad()
def sequence_log_perplexity(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 16, pad_token_id: int = 0
) -> np.ndarray:
    """Mean next-token negative log-likelihood (nats) of each sequence: the log of its perplexity.

    Every token after the first is a target, exactly as in training (the first token, e.g. BOS, is only context).
    Sequences are right-padded per batch; padding is masked and never a target. The model is put in eval mode and
    its previous mode restored.

    Args:
        model: a causal LM returning ``logits``.
        sequences: token id lists, each with at least 2 tokens.
        batch_size (`int`): sequences per forward pass.
        pad_token_id (`int`): id used for padding.

    Returns:
        `np.ndarray`: float64 ``[len(sequences)]``.
    """
    if any(len(s) < 2 for s in sequences):
        raise ValueError("Every sequence needs at least 2 tokens to have a next-token loss.")
    device, was_training = _device_of(model), model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for batch in _batches(list(sequences), batch_size):
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            # One row at a time: the loss's fp32 copies and log-softmax then cost one sequence's logits, not a
            # batch's (the batch's logits themselves are the peak: batch × length × vocabulary).
            losses = [per_example_causal_lm_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(len(batch))]
            out.append(torch.cat(losses).float().cpu().numpy().astype(np.float64))  # (MPS has no float64)
            del logits
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module, prefixes: Sequence[Sequence[int]], num_tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """Greedy (argmax) continuation of exactly `num_tokens` tokens for each prefix.

    A plain argmax loop over the model's logits, not `generate()`: `generate` fills unset options from the model's
    own `generation_config` (a checkpoint's `repetition_penalty`, `no_repeat_ngram_size`, `suppress_tokens` or EOS
    would change or stop the continuation), while a memorisation test needs the model's raw argmax, and a memorised
    EOS must not end it early. Each step re-runs the whole sequence (no KV cache, so no cache API is involved);
    that is cheap at the extraction test's length (100 tokens). All prefixes must have the same length, so no
    padding is involved.

    Returns:
        `list[list[int]]`: the generated tokens of each prefix.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}.")
    lengths = {len(p) for p in prefixes}
    if len(lengths) > 1 or 0 in lengths:
        raise ValueError("All prefixes must be non-empty and of the same length.")
    device, was_training = _device_of(model), model.training
    model.eval()
    results: list[list[int]] = []
    try:
        for batch in _batches([list(p) for p in prefixes], batch_size):
            ids = torch.as_tensor(batch, dtype=torch.long, device=device)
            start = ids.shape[1]
            for _ in range(num_tokens):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
            results.extend(ids[:, start:].tolist())
    finally:
        model.train(was_training)
    return results

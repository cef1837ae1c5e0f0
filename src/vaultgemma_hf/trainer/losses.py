"""Per-example language-modelling loss used by DP-SGD (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_example_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its labelled tokens.

    Labels are shifted like transformers' causal LM loss: position ``t`` of `logits` predicts ``labels[t + 1]``;
    targets equal to `ignore_index` are skipped. A sequence with no labelled token gets loss 0 (and gradient 0).
    The cross-entropy is computed in fp32 whatever the dtype of `logits`.

    Args:
        logits (`torch.Tensor`): ``[batch, seq, vocab]``.
        labels (`torch.Tensor`): ``[batch, seq]`` token ids or `ignore_index`.

    Returns:
        `torch.Tensor`: ``[batch]`` fp32 losses.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"Expected logits [B, S, V] and labels [B, S], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != ignore_index).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1).to(token_loss.dtype)

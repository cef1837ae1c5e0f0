"""`--verify`: compare an HF VaultGemma against the numpy reference forward over the JAX layout."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import model_classes, vaultgemma_deviations
from .errors import ConversionError
from .layout import Dims
from .reference_forward import reference_forward

DEFAULT_RTOL = 1e-3
"""Allowed max |logit difference| relative to max(1, max |reference logit|). fp32 rounding is orders of magnitude
below it; any mapping mistake (a swapped head, a transposed gate) is orders of magnitude above it."""


@dataclass
class VerifyResult:
    """Outcome of a logits comparison.

    Attributes:
        max_abs_diff: max |HF logit - reference logit| over all prompts, positions and vocabulary entries.
        max_abs_logit: max |reference logit| (the scale of the logits).
        tolerance: The threshold `max_abs_diff` had to stay below.
        num_prompts: Number of random prompts.
        seq_len: Tokens per prompt.
        what: What was compared (for the report).
        max_logit_spread: max over positions of (max - min reference logit over the vocabulary). Zero means the
            reference gives every token the same logit everywhere (e.g. the prompt tokens' embedding rows are all
            zero, as padding rows of a vocabulary read with the wrong size are): agreement then proves nothing, so
            the check fails.
    """

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    num_prompts: int
    seq_len: int
    what: str = "HF model vs reference forward over the JAX layout"
    max_logit_spread: float = float("inf")

    @property
    def informative(self) -> bool:
        return bool(self.max_logit_spread > 0)

    @property
    def passed(self) -> bool:
        return bool(self.informative and np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        if not self.informative:
            verdict += (
                " (uninformative: the reference gives every vocabulary entry the same logit at every position, e.g. "
                "because the prompt tokens' embedding rows are zero; check the vocabulary size and --config)"
            )
        return (
            f"verify ({self.what}, {self.num_prompts} random prompts x {self.seq_len} tokens): max abs logit "
            f"diff {self.max_abs_diff:.3e} (max |logit| {self.max_abs_logit:.3g}, tolerance {self.tolerance:.3e}) "
            f"{verdict}"
        )


def random_prompts(vocab_size: int, num_prompts: int = 3, seq_len: int = 16, seed: int = 0) -> np.ndarray:
    """`[num_prompts, seq_len]` token ids drawn uniformly from the vocabulary with a fixed seed."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(num_prompts, seq_len), dtype=np.int64)


def load_hf_model(source: str | os.PathLike | torch.nn.Module, *, round_to: torch.dtype | None = None):
    """Returns an fp32, eager-attention `VaultGemmaForCausalLM` in eval mode.

    Args:
        source: A checkpoint directory (loaded from safetensors) or a model.
        round_to: Round the weights to this dtype first (to compare against a checkpoint written in that dtype).
    """
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        _, model_class = model_classes()
        model = model_class.from_pretrained(
            str(source), dtype=torch.float32, attn_implementation="eager", use_safetensors=True
        )
    if round_to is not None:
        model = model.to(round_to)
    model = model.to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """float64 logits of an HF causal LM for `tokens [B, T]` (no padding, positions 0..T-1)."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits.to(torch.float64).numpy()


def compare_logits(
    actual: np.ndarray, reference: np.ndarray, *, rtol: float = DEFAULT_RTOL, what: str = ""
) -> VerifyResult:
    """Builds a `VerifyResult` from two logits arrays of the same shape."""
    if actual.shape != reference.shape:
        raise ConversionError(f"logits shapes differ: {actual.shape} vs {reference.shape}")
    scale = float(np.max(np.abs(reference)))
    result = VerifyResult(
        max_abs_diff=float(np.max(np.abs(actual - reference))),
        max_abs_logit=scale,
        tolerance=rtol * max(1.0, scale),
        num_prompts=reference.shape[0],
        seq_len=reference.shape[1],
        max_logit_spread=float(np.max(np.ptp(reference, axis=-1))),
    )
    if what:
        result.what = what
    return result


def verify_against_reference(
    hf_source: str | os.PathLike | torch.nn.Module,
    jax_params: Mapping[str, torch.Tensor],
    config: Any,
    gating_layout: str,
    *,
    round_hf_to: torch.dtype | None = None,
    num_prompts: int = 3,
    seq_len: int = 16,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    progress: bool = False,
) -> VerifyResult:
    """Runs random prompts through the HF model and through `reference_forward` over `jax_params`.

    Args:
        hf_source: HF checkpoint directory or model.
        jax_params: The JAX-layout weights (canonical keys) the HF model is supposed to be equivalent to.
        config: The VaultGemma config (sizes, RoPE base, epsilon, query scaling).
        gating_layout: Layout of `mlp/gating_einsum` in `jax_params`.
        round_hf_to: Round the HF weights to this dtype before running in fp32.
        num_prompts: Random prompts.
        seq_len: Tokens per prompt.
        seed: Seed of the prompts.
        rtol: Tolerance relative to max(1, max |reference logit|).
        progress: Show a progress bar over the reference's layers.

    Returns:
        The comparison; `passed` tells whether it is within tolerance.
    """
    deviations = vaultgemma_deviations(config)
    if deviations:
        raise ConversionError(f"--verify supports the VaultGemma architecture only; the config has {deviations}")
    dims = Dims.from_config(config)
    tokens = random_prompts(dims.vocab_size, num_prompts, seq_len, seed)
    rope = getattr(config, "rope_parameters", None) or {}
    reference = reference_forward(
        jax_params,
        tokens,
        num_layers=dims.num_layers,
        num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads,
        query_pre_attn_scalar=float(config.query_pre_attn_scalar),
        gating_layout=gating_layout,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.rms_norm_eps),
        progress=progress,
    )[..., : dims.vocab_size]
    model = load_hf_model(hf_source, round_to=round_hf_to)
    return compare_logits(hf_logits(model, tokens), reference, rtol=rtol)

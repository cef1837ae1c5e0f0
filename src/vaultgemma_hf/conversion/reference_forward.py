"""A plain numpy forward pass of VaultGemma written directly over the JAX parameter layout.

Used by `vaultgemma-hf convert --verify` as the reference the converted HF model must match. It follows the
layout's definition (the gemma library's einsums), not the converter: embeddings x sqrt(D); RMSNorm with
`(1 + scale)`; q/k/v einsums; RoPE with base 10000 on the two halves of each head (`[x1, x2] ->
[x1 cos - x2 sin, x2 cos + x1 sin]`, positions 0..T-1); scores scaled by `query_pre_attn_scalar ** -0.5`;
causal softmax; `attn_vec_einsum`; GeGLU with tanh-approximated GELU; final norm; logits = h @ E^T.
Everything is computed in float64, so the difference to an fp32 model is that model's own rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConversionError
from .layout import EMBEDDING, FINAL_NORM, find_post_norm_keys, layer_prefix
from .tensors import to_float64_numpy


def _f64(params: Mapping[str, torch.Tensor | np.ndarray], key: str) -> np.ndarray:
    value = params[key]
    return to_float64_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)


def _einsum(spec: str, *operands: np.ndarray) -> np.ndarray:
    """`np.einsum` through BLAS (`optimize=True`): the plain C loop takes minutes at the 1B shape."""
    return np.einsum(spec, *operands, optimize=True)


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """`x / sqrt(mean(x^2) + eps) * (1 + scale)` over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + scale)


def apply_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding on `x [B, T, heads, H]`, rotating the pair (i, i + H/2) by `pos * theta^(-2i/H)`."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    timescale = theta ** (2.0 * np.arange(half) / head_dim)
    angle = positions[:, None] / timescale[None, :]  # [T, H/2]
    sin, cos = np.sin(angle)[None, :, None, :], np.cos(angle)[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (flax `nn.gelu` default, HF `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def reference_forward(
    params: Mapping[str, torch.Tensor | np.ndarray],
    tokens: np.ndarray,
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    query_pre_attn_scalar: float,
    gating_layout: str,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
    logits_chunk: int = 32768,
    progress: bool = False,
) -> np.ndarray:
    """Logits of a VaultGemma whose weights are in the JAX layout.

    Args:
        params: Canonical JAX keys (see `layout`) to tensors or arrays of any float dtype.
        tokens: int array `[B, T]` (ids below the number of embedding rows).
        num_layers: Decoder blocks to run.
        num_heads: N.
        num_kv_heads: K (N must be a multiple of K).
        query_pre_attn_scalar: Scores are scaled by its inverse square root.
        gating_layout: `"FD"` (`gating_einsum [2, F, D]`) or `"DF"` (`[2, D, F]`).
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        logits_chunk: Embedding rows per chunk of the output projection (bounds memory for big vocabularies).
        progress: Show a progress bar over the layers.

    Returns:
        float64 logits `[B, T, rows of the embedding table]`.
    """
    post = find_post_norm_keys(params)
    if post:
        raise ConversionError(f"the reference forward has no post-norms; found {post[:2]}")
    tokens = np.asarray(tokens)
    embedding = params[EMBEDDING]
    rows, hidden = embedding.shape
    if tokens.min() < 0 or tokens.max() >= rows:
        raise ConversionError(f"token ids must be in [0, {rows})")
    batch, length = tokens.shape
    gather = embedding[torch.as_tensor(tokens)] if isinstance(embedding, torch.Tensor) else embedding[tokens]
    x = _f64({"e": gather}, "e") * np.sqrt(hidden)
    positions = np.arange(length, dtype=np.float64)
    causal = np.tril(np.ones((length, length), dtype=bool))
    group = num_heads // num_kv_heads

    for i in tqdm(range(num_layers), desc="reference forward", disable=not progress):
        p = layer_prefix(i)
        h = rms_norm(x, _f64(params, p + "pre_attention_norm/scale"), rms_norm_eps)
        if p + "attn/qkv_einsum/w" in params:
            w = _f64(params, p + "attn/qkv_einsum/w")
            q, k, v = (_einsum("btd,ndh->btnh", h, w[j]) for j in range(3))
        else:
            q = _einsum("btd,ndh->btnh", h, _f64(params, p + "attn/q_einsum/w"))
            kv = _f64(params, p + "attn/kv_einsum/w")
            k, v = _einsum("btd,kdh->btkh", h, kv[0]), _einsum("btd,kdh->btkh", h, kv[1])
        q = apply_rope(q, positions, rope_theta) * query_pre_attn_scalar**-0.5
        k = apply_rope(k, positions, rope_theta)
        # Query head n reads key/value head n // group.
        q = q.reshape(batch, length, num_kv_heads, group, q.shape[-1])
        scores = _einsum("btkgh,bskh->bkgts", q, k)
        scores = np.where(causal, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        encoded = _einsum("bkgts,bskh->btkgh", probs, v).reshape(batch, length, num_heads, -1)
        x = x + _einsum("btnh,nhd->btd", encoded, _f64(params, p + "attn/attn_vec_einsum/w"))

        h = rms_norm(x, _f64(params, p + "pre_ffw_norm/scale"), rms_norm_eps)
        gating = _f64(params, p + "mlp/gating_einsum")
        pattern = "btd,fd->btf" if gating_layout.upper() == "FD" else "btd,df->btf"
        gate, up = _einsum(pattern, h, gating[0]), _einsum(pattern, h, gating[1])
        x = x + _einsum("btf,fd->btd", gelu_tanh(gate) * up, _f64(params, p + "mlp/linear"))

    x = rms_norm(x, _f64(params, FINAL_NORM), rms_norm_eps)
    logits = np.empty((batch, length, rows), dtype=np.float64)
    for start in range(0, rows, logits_chunk):
        block = _f64({"e": embedding[start : start + logits_chunk]}, "e")
        logits[..., start : start + block.shape[0]] = x @ block.T
    return logits

"""Pure per-layer rules for per-sample gradients, their norms and their clipped sums.

Every function here is stateless math on tensors captured by the engine's hooks: the input activations ``A`` of a
layer, the gradients ``G`` of the loss with respect to the layer's output, token ids for embeddings. The leading
dimension of every tensor is the sample (the privacy unit); all other leading dimensions are flattened into one
"token" dimension ``T``. Results (norms, cross terms, gradients) are computed in ``dtype`` (float32 by default)
whatever the dtype of the inputs, so bf16 activations under autocast give float32 norms of the exact per-sample
gradient of the bf16 values.

Notation for a linear layer ``y = x W^T + b`` with ``W`` of shape ``[out, in]``:
per-sample gradient ``dW_i = G_i^T A_i = sum_t g_t a_t^T`` and ``db_i = sum_t g_t``.

* Ghost (Gram) norm: ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>``: cost ``~ T^2 (in + out)`` per sample,
  memory ``B T^2``.
* Materialised norm: build ``dW_i`` (cost ``~ T in out`` per sample, memory ``B in out``) and take its norm.
* Book-keeping clipped sum: ``sum_i c_i dW_i = (c * G)^T A`` in one matmul over all samples and tokens.

For an embedding ``y_t = s * W[id_t]`` (``s`` the embedding scale, 1 for ``nn.Embedding``), the per-sample gradient
is the scatter-add of ``s * g_t`` into rows ``id_t``; tokens equal to ``padding_idx`` get no gradient.
"""

from __future__ import annotations

import torch

__all__ = [
    "LinearPlan",
    "bmm_fp32",
    "choose_linear_plan",
    "clip_factors",
    "embedding_clipped_sum_",
    "embedding_cross",
    "embedding_linear_cross",
    "embedding_materialized_cross",
    "embedding_per_sample_grads",
    "embedding_rows_of",
    "embedding_sq_norms",
    "flatten_tokens",
    "gram",
    "linear_bias_per_sample_grads",
    "addmm_fp32",
    "linear_clipped_sum",
    "linear_cross_ghost",
    "linear_sq_norms_ghost",
    "linear_sq_norms_materialized",
    "linear_weight_per_sample_grads",
    "materialized_cross",
    "materialized_sq_norms",
]

# Upper bound on the size (in bytes) of temporary float32 buffers built by one call (per-sample gradients built
# only for their norm, upcast copies of bf16 operands). Work is split over samples to stay under it.
DEFAULT_CHUNK_BYTES = 512 * 2**20

_OUT_DTYPE_MATMUL_OK: dict[str, bool] = {}


def _promote(dtype: torch.dtype, norm_dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: ``norm_dtype`` unless the inputs are more precise (float64 models)."""
    return torch.promote_types(dtype, norm_dtype) if dtype.is_floating_point else norm_dtype


def _sample_chunks(batch: int, bytes_per_sample: int, chunk_bytes: int) -> list[slice]:
    step = max(1, chunk_bytes // max(1, bytes_per_sample))
    return [slice(i, min(batch, i + step)) for i in range(0, batch, step)]


def _use_out_dtype(a: torch.Tensor, b: torch.Tensor, out: torch.dtype) -> bool:
    """Whether ``a @ b`` can be done on the low-precision values with a float32 result (CUDA ``out_dtype`` ops)."""
    return (
        a.is_cuda
        and out == torch.float32
        and a.dtype == b.dtype
        and a.dtype in (torch.bfloat16, torch.float16)
        and _OUT_DTYPE_MATMUL_OK.get(f"{a.device}:{a.dtype}", True)
    )


def _out_dtype_failed(a: torch.Tensor) -> None:
    _OUT_DTYPE_MATMUL_OK[f"{a.device}:{a.dtype}"] = False


def bmm_fp32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batched ``a @ b`` with a ``dtype`` result that is exact for low-precision inputs.

    For bf16/fp16 CUDA inputs this multiplies the low-precision values directly with a float32 result
    (``out_dtype``: no rounding of the result to bf16, no upcast copies). Elsewhere the operands are upcast.

    Args:
        a: ``[B, n, k]``.
        b: ``[B, k, m]``.
        dtype: result dtype (at least float32).

    Returns:
        ``[B, n, m]`` in ``_promote(a.dtype, dtype)``.
    """
    out = _promote(a.dtype, dtype)
    if a.dtype == out and b.dtype == out:
        return torch.bmm(a, b)
    if _use_out_dtype(a, b, out):
        try:
            return torch.ops.aten.bmm.dtype(a, b, torch.float32)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):  # unsupported here: upcast from now on
            _out_dtype_failed(a)
    return torch.bmm(a.to(out), b.to(out))


_INPLACE_ADDMM_OK: dict[str, bool] = {}


def _inplace_addmm_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Checks once per device/dtype that ``addmm.dtype_out(acc, ..., out=acc)`` accumulates correctly in place."""
    key = f"{device}:{dtype}"
    if key not in _INPLACE_ADDMM_OK:
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(64, 40, device=device, generator=gen).to(dtype)
            b = torch.randn(40, 48, device=device, generator=gen).to(dtype)
            acc = torch.randn(64, 48, device=device, generator=gen)
            expected = acc + 0.37 * (a.float() @ b.float())
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, beta=1, alpha=0.37, out=acc)
            _INPLACE_ADDMM_OK[key] = bool(torch.allclose(acc, expected, rtol=1e-5, atol=1e-5))
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            _INPLACE_ADDMM_OK[key] = False
    return _INPLACE_ADDMM_OK[key]


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``acc + alpha * (a @ b)`` with the product of the (possibly bf16) operands computed exactly in ``acc.dtype``.

    The scale is applied in float32 to the float32 product, never to the bf16 operands. Returns ``acc`` updated in
    place, or a new tensor where only an out-of-place kernel is available (the caller rebinds its accumulator).
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b, alpha=alpha)
    if _use_out_dtype(a, b, acc.dtype):
        try:
            if _inplace_addmm_dtype_ok(acc.device, a.dtype):
                return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, beta=1, alpha=alpha, out=acc)
            return torch.ops.aten.addmm.dtype(acc, a, b, torch.float32, beta=1, alpha=alpha)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            _out_dtype_failed(a)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), alpha=alpha)


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, *, d] -> [B, T, d]`` (``T = 1`` for ``[B, d]``)."""
    if x.dim() < 2:
        raise ValueError(f"expected a tensor with a leading batch dimension and a feature dimension, got {x.shape}")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def clip_factors(norms: torch.Tensor, max_grad_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample clipping factors ``min(1, C / (||g_i|| + eps))``."""
    return (max_grad_norm / (norms + eps)).clamp(max=1.0)


# --------------------------------------------------------------------------------------------------- linear


class LinearPlan:
    """How a linear layer's weight is handled: how its norm is computed and what is kept for the clipped sum.

    Attributes:
        norm: ``"ghost"`` (Gram matrices) or ``"materialize"`` (build per-sample gradients for the norm).
        keep_per_sample: keep the materialised per-sample gradients until the clipping factors are known (their
            clipped sum is then a cheap weighted sum), instead of keeping ``A`` and ``G`` for a book-keeping matmul.
    """

    __slots__ = ("norm", "keep_per_sample")

    def __init__(self, norm: str, keep_per_sample: bool) -> None:
        self.norm = norm
        self.keep_per_sample = keep_per_sample

    def __repr__(self) -> str:
        return f"LinearPlan(norm={self.norm!r}, keep_per_sample={self.keep_per_sample})"


def choose_linear_plan(
    batch: int,
    tokens: int,
    d_in: int,
    d_out: int,
    activation_bytes: int = 4,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    bytes_cost: float = 0.0,
) -> LinearPlan:
    """Chooses, by cost, how to get a linear layer's per-sample weight-gradient norms and clipped sum.

    * Norm cost per sample, in multiply-adds plus ``bytes_cost`` per byte of memory traffic: ghost
      ``T^2 (in + out)`` (+ ``16 T^2`` bytes for the two float32 Gram matrices) vs materialised ``T in out``
      (+ ``8 in out`` bytes to write and re-read the float32 gradient). Materialising is only allowed when one
      sample's float32 gradient fits in ``chunk_bytes``.
    * Clipped sum: keeping materialised per-sample gradients (``B in out`` float32) makes the clipped sum almost
      free (no book-keeping matmul); it is chosen only when they take no more memory than the activations and
      output gradients (``B T (in + out)`` elements of ``activation_bytes``) that book-keeping would keep instead.

    Args:
        batch: samples ``B``.
        tokens: tokens per sample ``T`` (product of the middle dimensions).
        d_in: input features.
        d_out: output features.
        activation_bytes: bytes per element of the stored activations / output gradients (2 under bf16 autocast).
        chunk_bytes: cap on temporary buffers.
        bytes_cost: multiply-adds one byte of memory traffic is worth (about 100 on an H100, a few on a CPU).

    Returns:
        The plan.
    """
    ghost = tokens * tokens * (d_in + d_out) + bytes_cost * 16 * tokens * tokens
    materialize = tokens * d_in * d_out + bytes_cost * 8 * d_in * d_out
    can_materialize = d_in * d_out * 4 <= chunk_bytes
    if not can_materialize or ghost < materialize:
        return LinearPlan("ghost", False)
    keep = batch * d_in * d_out * 4 <= batch * tokens * (d_in + d_out) * activation_bytes
    return LinearPlan("materialize", keep)


def gram(X: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample Gram matrices ``X_i X_i^T``: ``[B, T, d] -> [B, T, T]`` (exact float32 result for bf16 ``X``)."""
    X = flatten_tokens(X)
    return bmm_fp32(X, X.transpose(1, 2), dtype)


def linear_weight_per_sample_grads(
    A: torch.Tensor, G: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-sample weight gradients ``G_i^T A_i``: ``[B, T, in], [B, T, out] -> [B, out, in]``."""
    A, G = flatten_tokens(A), flatten_tokens(G)
    return bmm_fp32(G.transpose(1, 2), A, dtype)


def linear_bias_per_sample_grads(G: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample bias gradients ``sum_t g_t``: ``[B, T, out] -> [B, out]``."""
    G = flatten_tokens(G)
    return G.to(_promote(G.dtype, dtype)).sum(dim=1)


def linear_sq_norms_ghost(
    A: torch.Tensor,
    G: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    gram_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared per-sample weight-gradient norms by the Gram ("ghost") identity ``<A_i A_i^T, G_i G_i^T>``.

    ``gram_a`` (``[B, T, T]``) may be passed when it was already computed for another layer reading the same input
    (q/k/v projections, gate/up projections).
    """
    if gram_a is None:
        return linear_cross_ghost(A, G, A, G, dtype, chunk_bytes)
    G = flatten_tokens(G)
    batch, tokens = G.shape[0], G.shape[1]
    result = torch.empty(batch, dtype=gram_a.dtype, device=G.device)
    for sl in _sample_chunks(batch, 4 * tokens * (tokens + G.shape[2]), chunk_bytes):
        result[sl] = (gram_a[sl] * gram(G[sl], dtype)).sum(dim=(1, 2))
    return result


def linear_cross_ghost(
    A1: torch.Tensor,
    G1: torch.Tensor,
    A2: torch.Tensor,
    G2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Per-sample ``<G1_i^T A1_i, G2_i^T A2_i>_F = <A1_i A2_i^T, G1_i G2_i^T>`` (two uses of one weight)."""
    A1, G1, A2, G2 = (flatten_tokens(x) for x in (A1, G1, A2, G2))
    batch, t1, t2 = A1.shape[0], A1.shape[1], A2.shape[1]
    out = _promote(A1.dtype, dtype)
    upcast = 4 * (t1 * (A1.shape[2] + G1.shape[2]) + t2 * (A2.shape[2] + G2.shape[2])) if A1.dtype != out else 0
    result = torch.empty(batch, dtype=out, device=A1.device)
    for sl in _sample_chunks(batch, 8 * t1 * t2 + upcast, chunk_bytes):
        gram_a = bmm_fp32(A1[sl], A2[sl].transpose(1, 2), dtype)
        gram_g = bmm_fp32(G1[sl], G2[sl].transpose(1, 2), dtype)
        result[sl] = (gram_a * gram_g).sum(dim=(1, 2))
    return result


def linear_sq_norms_materialized(
    A: torch.Tensor, G: torch.Tensor, dtype: torch.dtype = torch.float32, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Squared per-sample weight-gradient norms by building the gradients a chunk of samples at a time."""
    A, G = flatten_tokens(A), flatten_tokens(G)
    batch = A.shape[0]
    out = _promote(A.dtype, dtype)
    result = torch.empty(batch, dtype=out, device=A.device)
    for sl in _sample_chunks(batch, 4 * A.shape[2] * G.shape[2], chunk_bytes):
        grads = linear_weight_per_sample_grads(A[sl], G[sl], dtype)
        result[sl] = materialized_sq_norms(grads)
    return result


def linear_clipped_sum(
    out: torch.Tensor,
    A: torch.Tensor,
    G: torch.Tensor,
    factors: torch.Tensor,
    factors_host: list[float] | None = None,
    exact_scaling: bool = True,
) -> torch.Tensor:
    """Book-keeping: returns ``out + sum_i c_i G_i^T A_i`` (the clipped sum of per-sample weight gradients).

    With float32 operands this is one matmul over all samples and tokens, ``(c * G)^T A``, added in place. With
    bf16/fp16 operands and ``exact_scaling`` the factor is applied in ``out.dtype`` to each sample's exact float32
    product (one matmul per sample), never to the low-precision operands, so the added term is exactly (to float32
    accumulation) the clipped gradient whose norm was measured. Without ``exact_scaling`` the factors are folded
    into the bf16 ``G`` (one matmul; each sample's contribution may then exceed C by the bf16 rounding of
    ``c_i G_i``, ~2^-8 relative per element).

    Args:
        out: ``[out, in]`` accumulator (float32 or float64).
        A: ``[B, *, in]`` activations.
        G: ``[B, *, out]`` output gradients.
        factors: ``[B]`` clipping factors (0 for samples to leave out).
        factors_host: the same factors as Python floats (avoids a device sync per layer in the exact bf16 path).
        exact_scaling: see above (only matters for low-precision operands).

    Returns:
        The updated accumulator (``out`` itself, or a new tensor in some bf16 paths).
    """
    A, G = flatten_tokens(A), flatten_tokens(G)
    if (G.dtype == out.dtype and A.dtype == out.dtype) or not exact_scaling:
        # scale whichever operand is smaller: sum_i (c_i G_i)^T A_i = sum_i G_i^T (c_i A_i)
        c = factors.to(out.dtype if G.dtype == out.dtype else G.dtype)[:, None, None]
        if A.shape[-1] < G.shape[-1]:
            left, right = G.reshape(-1, G.shape[-1]).t(), (A * c).reshape(-1, A.shape[-1])
        else:
            left, right = (G * c).reshape(-1, G.shape[-1]).t(), A.reshape(-1, A.shape[-1])
        if left.dtype == out.dtype:
            return out.addmm_(left, right)
        return addmm_fp32(out, left, right, 1.0)
    if factors_host is None:
        factors_host = factors.tolist()
    for i, factor in enumerate(factors_host):
        if factor != 0.0:
            out = addmm_fp32(out, G[i].t(), A[i], factor)
    return out


# ----------------------------------------------------------------------------------------------- embedding


def _embedding_tokens(
    ids: torch.Tensor, G: torch.Tensor, padding_idx: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattens ``ids [B, *]`` and ``G [B, *, D]`` to ``[B, T]`` / ``[B, T, D]`` with padding tokens' grads zeroed."""
    ids = ids.reshape(ids.shape[0], -1)
    G = G.reshape(ids.shape[0], ids.shape[1], G.shape[-1]).to(_promote(G.dtype, dtype))
    if padding_idx is not None:
        G = G * (ids != padding_idx).unsqueeze(-1).to(G.dtype)
    return ids, G


def embedding_per_sample_grads(
    ids: torch.Tensor,
    G: torch.Tensor,
    scale: float,
    padding_idx: int | None,
    num_embeddings: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense per-sample embedding gradients ``[B, V, D]`` (slow reference; memory ``B V D``)."""
    ids, G = _embedding_tokens(ids, G, padding_idx, dtype)
    out = torch.zeros(ids.shape[0], num_embeddings, G.shape[-1], dtype=G.dtype, device=G.device)
    out.scatter_add_(1, ids.unsqueeze(-1).expand_as(G), G * scale)
    return out


def embedding_sq_norms(
    ids: torch.Tensor,
    G: torch.Tensor,
    scale: float,
    padding_idx: int | None,
    num_embeddings: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Squared per-sample embedding-gradient norms ``s^2 sum_v ||sum_{t: id_t = v} g_t||^2``.

    Rows are aggregated per (sample, token id) with one sort (``torch.unique``) and an ``index_add``: cost
    ``O(B T D)``, no ``V``-sized or ``T^2`` buffer.
    """
    ids, G = _embedding_tokens(ids, G, padding_idx, dtype)
    batch, tokens, dim = G.shape
    sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand(batch, tokens).reshape(-1)
    key = sample * num_embeddings + ids.reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), dim, dtype=G.dtype, device=G.device)
    rows.index_add_(0, inverse, G.reshape(-1, dim))
    out = torch.zeros(batch, dtype=G.dtype, device=G.device)
    out.index_add_(0, torch.div(uniq, num_embeddings, rounding_mode="floor"), rows.pow(2).sum(dim=1))
    return out * (scale * scale)


def embedding_rows_of(per_sample: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``per_sample[i, ids[i, t]]``: ``[B, V, D], [B, T] -> [B, T, D]``."""
    ids = ids.reshape(ids.shape[0], -1)
    return torch.gather(per_sample, 1, ids.unsqueeze(-1).expand(-1, -1, per_sample.shape[-1]))


def embedding_cross(
    ids1: torch.Tensor,
    G1: torch.Tensor,
    scale1: float,
    pad1: int | None,
    ids2: torch.Tensor,
    G2: torch.Tensor,
    scale2: float,
    pad2: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sample ``<E1_i, E2_i>`` for two embedding uses of one table: ``sum_{t,u} [id_t = id_u] <g_t, g_u>``."""
    ids1, G1 = _embedding_tokens(ids1, G1, pad1, dtype)
    ids2, G2 = _embedding_tokens(ids2, G2, pad2, dtype)
    same = (ids1.unsqueeze(2) == ids2.unsqueeze(1)).to(G1.dtype)
    return (torch.bmm(G1, G2.transpose(1, 2)) * same).sum(dim=(1, 2)) * (scale1 * scale2)


def embedding_linear_cross(
    ids: torch.Tensor,
    G_emb: torch.Tensor,
    scale: float,
    padding_idx: int | None,
    A_lin: torch.Tensor,
    G_lin: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Per-sample ``<E_i, L_i>`` for a table used as an embedding (E) and as a linear weight (L, a tied LM head).

    ``L_i = G_lin_i^T A_lin_i`` has shape ``[V, D]``; only its rows at the sample's embedded ids matter:
    ``<E_i, L_i> = s sum_t <g_t, L_i[id_t]>`` with ``L_i[id_t] = sum_s G_lin_i[s, id_t] a_s``. Gathering the
    ``T_emb`` columns of ``G_lin_i`` and one ``[T_emb, T_lin] @ [T_lin, D]`` matmul per sample gives it, cost
    ``T_emb T_lin D``, without building any ``V x D`` gradient.
    """
    ids, G_emb = _embedding_tokens(ids, G_emb, padding_idx, dtype)
    A_lin, G_lin = flatten_tokens(A_lin), flatten_tokens(G_lin)
    batch, t_emb = ids.shape
    t_lin = G_lin.shape[1]
    result = torch.empty(batch, dtype=G_emb.dtype, device=G_emb.device)
    for sl in _sample_chunks(batch, 4 * t_lin * (t_emb + A_lin.shape[2]) + 4 * t_emb * A_lin.shape[2], chunk_bytes):
        index = ids[sl].unsqueeze(1).expand(-1, t_lin, -1)  # [b, T_lin, T_emb]
        cols = torch.gather(G_lin[sl], 2, index)  # G_lin[b, s, id_t]
        rows = bmm_fp32(cols.transpose(1, 2), A_lin[sl], dtype)  # [b, T_emb, D] = L_b[id_t]
        result[sl] = (rows.to(G_emb.dtype) * G_emb[sl]).sum(dim=(1, 2))
    return result * scale


def embedding_materialized_cross(
    ids: torch.Tensor,
    G: torch.Tensor,
    scale: float,
    padding_idx: int | None,
    per_sample: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sample ``<E_i, P_i>`` with ``P`` materialised ``[B, V, D]`` per-sample gradients of the same table."""
    ids, G = _embedding_tokens(ids, G, padding_idx, dtype)
    rows = embedding_rows_of(per_sample, ids).to(G.dtype)
    return (rows * G).sum(dim=(1, 2)) * scale


def embedding_clipped_sum_(
    out: torch.Tensor, ids: torch.Tensor, G: torch.Tensor, scale: float, padding_idx: int | None, factors: torch.Tensor
) -> None:
    """Adds ``sum_i c_i E_i`` to the ``[V, D]`` accumulator ``out`` (one ``index_add``)."""
    ids, G = _embedding_tokens(ids, G, padding_idx, out.dtype)
    scaled = G * (factors.to(out.dtype) * scale)[:, None, None]
    out.index_add_(0, ids.reshape(-1), scaled.reshape(-1, G.shape[-1]))


# ------------------------------------------------------------------------------------------ materialised


def materialized_sq_norms(grads: torch.Tensor) -> torch.Tensor:
    """Squared norms of per-sample gradients ``[B, ...] -> [B]`` (one reduction, no squared temporary)."""
    return torch.linalg.vector_norm(grads.reshape(grads.shape[0], -1), dim=1).square()


def materialized_cross(grads1: torch.Tensor, grads2: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products of two per-sample gradient tensors of one parameter."""
    return (grads1.reshape(grads1.shape[0], -1) * grads2.reshape(grads2.shape[0], -1)).sum(dim=1)

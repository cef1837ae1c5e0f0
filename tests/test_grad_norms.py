"""Per-layer per-sample gradient rules (vaultgemma_hf.dp.grad_norms) against slow autograd ground truths.

The ground truth for every rule is one ``torch.autograd.grad`` per sample through the real op (``F.linear``,
``F.embedding``) with the output gradient injected as ``(out * G_i).sum()``; nothing is compared with itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vaultgemma_hf.dp import grad_norms as gn
from vaultgemma_hf.dp.noise import add_gaussian_noise, gaussian_noise_like

DT = torch.float64


def _linear_truth(A, G, W, b=None):
    """Per-sample (dW_i, db_i) by autograd through F.linear, one sample at a time."""
    dWs, dbs = [], []
    for i in range(A.shape[0]):
        Wl = W.clone().requires_grad_(True)
        bl = b.clone().requires_grad_(True) if b is not None else None
        out = F.linear(A[i], Wl, bl)
        grads = torch.autograd.grad((out * G[i]).sum(), [Wl] + ([bl] if bl is not None else []))
        dWs.append(grads[0])
        if bl is not None:
            dbs.append(grads[1])
    return torch.stack(dWs), (torch.stack(dbs) if dbs else None)


def _embedding_truth(ids, G, W, scale, padding_idx):
    dWs = []
    for i in range(ids.shape[0]):
        Wl = W.clone().requires_grad_(True)
        out = F.embedding(ids[i], Wl, padding_idx) * scale
        dWs.append(torch.autograd.grad((out * G[i]).sum(), Wl)[0])
    return torch.stack(dWs)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("shape", [(3, 5), (3, 7, 5), (2, 3, 4, 5)])
def test_linear_rules_match_autograd(shape, gen):
    d_in, d_out = shape[-1], 6
    A = torch.randn(*shape, generator=gen, dtype=DT)
    G = torch.randn(*shape[:-1], d_out, generator=gen, dtype=DT)
    W = torch.randn(d_out, d_in, generator=gen, dtype=DT)
    b = torch.randn(d_out, generator=gen, dtype=DT)
    dW, db = _linear_truth(A, G, W, b)
    truth_sq = dW.pow(2).sum(dim=(1, 2))

    torch.testing.assert_close(gn.linear_weight_per_sample_grads(A, G, DT), dW)
    torch.testing.assert_close(gn.linear_bias_per_sample_grads(G, DT), db)
    torch.testing.assert_close(gn.linear_sq_norms_ghost(A, G, DT), truth_sq)
    torch.testing.assert_close(gn.linear_sq_norms_materialized(A, G, DT), truth_sq)
    # chunking over samples (tiny chunk budget) gives the same result
    torch.testing.assert_close(gn.linear_sq_norms_ghost(A, G, DT, chunk_bytes=1), truth_sq)
    torch.testing.assert_close(gn.linear_sq_norms_materialized(A, G, DT, chunk_bytes=1), truth_sq)

    factors = torch.rand(A.shape[0], generator=gen, dtype=DT)
    out = gn.linear_clipped_sum(torch.zeros(d_out, d_in, dtype=DT), A, G, factors)
    torch.testing.assert_close(out, (factors[:, None, None] * dW).sum(0))


def test_linear_cross_ghost_matches_autograd(gen):
    """Two uses of one weight with different inputs/token counts: <dW1_i, dW2_i> per sample."""
    A1, G1 = torch.randn(3, 4, 5, generator=gen, dtype=DT), torch.randn(3, 4, 6, generator=gen, dtype=DT)
    A2, G2 = torch.randn(3, 7, 5, generator=gen, dtype=DT), torch.randn(3, 7, 6, generator=gen, dtype=DT)
    W = torch.randn(6, 5, generator=gen, dtype=DT)
    dW1, _ = _linear_truth(A1, G1, W)
    dW2, _ = _linear_truth(A2, G2, W)
    torch.testing.assert_close(gn.linear_cross_ghost(A1, G1, A2, G2, DT), (dW1 * dW2).sum(dim=(1, 2)))


def test_linear_clipped_sum_low_precision_scales_exact_product(gen):
    """bf16 operands: the factor is applied to the float32 product, never to the bf16 values."""
    A = torch.randn(3, 4, 5, generator=gen).bfloat16()
    G = torch.randn(3, 4, 6, generator=gen).bfloat16()
    factors = torch.tensor([0.3, 1.0, 0.0])
    out = gn.linear_clipped_sum(torch.zeros(6, 5), A, G, factors)
    dW, _ = _linear_truth(A.double(), G.double(), torch.zeros(6, 5, dtype=DT))
    torch.testing.assert_close(out.double(), (factors.double()[:, None, None] * dW).sum(0), rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32
    prod = gn.bmm_fp32(G.transpose(1, 2), A)
    assert prod.dtype == torch.float32
    torch.testing.assert_close(prod.double(), dW, rtol=1e-6, atol=1e-6)


def test_out_dtype_kernels_fall_back_when_unavailable(monkeypatch, gen):
    """Where bf16-in/fp32-out kernels are missing (here: on CPU, pretending to be CUDA), results are unchanged."""
    monkeypatch.setattr(gn, "_OUT_DTYPE_MATMUL_OK", {})
    monkeypatch.setattr(gn, "_INPLACE_ADDMM_OK", {})
    a = torch.randn(2, 5, 3, generator=gen).bfloat16()
    b = torch.randn(2, 3, 4, generator=gen).bfloat16()
    expected = torch.bmm(a.float(), b.float())
    acc = torch.randn(5, 4, generator=gen)
    expected_acc = acc + 0.5 * (a[0].float() @ b[0].float())
    monkeypatch.setattr(gn, "_use_out_dtype", lambda x, y, out: True)
    torch.testing.assert_close(gn.bmm_fp32(a, b), expected)
    torch.testing.assert_close(gn.addmm_fp32(acc.clone(), a[0], b[0], 0.5), expected_acc)
    assert gn._OUT_DTYPE_MATMUL_OK and not any(gn._OUT_DTYPE_MATMUL_OK.values())


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_embedding_rules_match_autograd(padding_idx, scale, gen):
    V, D = 11, 4
    ids = torch.randint(0, V, (3, 9), generator=gen)
    ids[0, :3] = 5  # repeated ids within a sample
    ids[1, 2] = 0
    G = torch.randn(3, 9, D, generator=gen, dtype=DT)
    W = torch.randn(V, D, generator=gen, dtype=DT)
    dE = _embedding_truth(ids, G, W, scale, padding_idx)

    torch.testing.assert_close(gn.embedding_per_sample_grads(ids, G, scale, padding_idx, V, DT), dE)
    torch.testing.assert_close(gn.embedding_sq_norms(ids, G, scale, padding_idx, V, DT), dE.pow(2).sum(dim=(1, 2)))
    factors = torch.rand(3, generator=gen, dtype=DT)
    acc = torch.zeros(V, D, dtype=DT)
    gn.embedding_clipped_sum_(acc, ids, G, scale, padding_idx, factors)
    torch.testing.assert_close(acc, (factors[:, None, None] * dE).sum(0))

    # second embedding use of the same table (other ids, other scale)
    ids2 = torch.randint(0, V, (3, 5), generator=gen)
    G2 = torch.randn(3, 5, D, generator=gen, dtype=DT)
    dE2 = _embedding_truth(ids2, G2, W, 1.0, None)
    torch.testing.assert_close(
        gn.embedding_cross(ids, G, scale, padding_idx, ids2, G2, 1.0, None, DT), (dE * dE2).sum(dim=(1, 2))
    )


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_tied_embedding_linear_cross_matches_autograd(padding_idx, gen):
    """Table used as embedding (scale s) and as LM head weight: <E_i, L_i> without any V x D buffer."""
    V, D, scale = 13, 4, 3.0
    ids = torch.randint(0, V, (2, 6), generator=gen)
    ids[0, 1] = ids[0, 4]
    ids[1, 0] = 0
    G_emb = torch.randn(2, 6, D, generator=gen, dtype=DT)
    A_lin = torch.randn(2, 5, D, generator=gen, dtype=DT)  # head input, other token count
    G_lin = torch.randn(2, 5, V, generator=gen, dtype=DT)  # head output gradient
    W = torch.randn(V, D, generator=gen, dtype=DT)
    dE = _embedding_truth(ids, G_emb, W, scale, padding_idx)
    dL, _ = _linear_truth(A_lin, G_lin, W)
    truth = (dE * dL).sum(dim=(1, 2))
    torch.testing.assert_close(gn.embedding_linear_cross(ids, G_emb, scale, padding_idx, A_lin, G_lin, DT), truth)
    torch.testing.assert_close(
        gn.embedding_linear_cross(ids, G_emb, scale, padding_idx, A_lin, G_lin, DT, chunk_bytes=1), truth
    )
    torch.testing.assert_close(gn.embedding_materialized_cross(ids, G_emb, scale, padding_idx, dL, DT), truth)


def test_materialized_helpers_and_clip_factors(gen):
    g1 = torch.randn(4, 3, 2, generator=gen, dtype=DT)
    g2 = torch.randn(4, 3, 2, generator=gen, dtype=DT)
    torch.testing.assert_close(gn.materialized_sq_norms(g1), torch.stack([x.norm() ** 2 for x in g1]))
    torch.testing.assert_close(gn.materialized_cross(g1, g2), torch.stack([(x * y).sum() for x, y in zip(g1, g2)]))
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0], dtype=DT)
    torch.testing.assert_close(
        gn.clip_factors(norms, 1.0), torch.tensor([1.0, 1.0, 1.0 / (1.0 + 1e-6), 1.0 / (4.0 + 1e-6)], dtype=DT)
    )


def test_choose_linear_plan_by_cost():
    # short sequences, wide layer: Gram matrices are cheaper than T * in * out
    plan = gn.choose_linear_plan(4, 16, 1024, 4096)
    assert plan.norm == "ghost" and not plan.keep_per_sample
    # long sequences, narrow layer: materialising is cheaper, and keeping the gradients costs less memory
    plan = gn.choose_linear_plan(4, 1024, 8, 16)
    assert plan.norm == "materialize" and plan.keep_per_sample
    # 1B shape: LM head (256000 x 1152) never materialised (one sample's gradient exceeds the temporary cap)
    assert gn.choose_linear_plan(4, 1024, 1152, 256000, activation_bytes=2).norm == "ghost"
    # 1B MLP at T=1024 under bf16: materialise for the norm, but keep A and G (smaller than B x in x out fp32)
    plan = gn.choose_linear_plan(4, 1024, 1152, 6912, activation_bytes=2)
    assert plan.norm == "materialize" and not plan.keep_per_sample
    # ... unless memory traffic is expensive (GPU): writing and re-reading B x in x out floats tips it to ghost
    assert gn.choose_linear_plan(4, 1024, 1152, 6912, activation_bytes=2, bytes_cost=100).norm == "ghost"


def test_noise_is_float32_with_requested_std():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(200_000, dtype=torch.bfloat16)
    noise = gaussian_noise_like(x, 0.7, gen)
    assert noise.dtype == torch.float32
    assert abs(noise.std().item() - 0.7) < 0.01 and abs(noise.mean().item()) < 0.01
    base = torch.arange(200_000, dtype=torch.float32)
    noisy = add_gaussian_noise(base.clone(), 0.5, gen)
    assert abs((noisy - base).std().item() - 0.5) < 0.01 and abs((noisy - base).mean().item()) < 0.01
    acc = torch.ones(1000)
    assert torch.equal(add_gaussian_noise(acc, 0.0, gen), torch.ones(1000))
    with pytest.raises(ValueError, match="float32"):
        add_gaussian_noise(x, 1.0, gen)
    with pytest.raises(ValueError, match=">= 0"):
        add_gaussian_noise(acc, -1.0, gen)

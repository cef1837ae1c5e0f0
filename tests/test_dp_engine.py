"""DPGradientEngine against a slow per-example oracle on tiny random VaultGemma models.

Oracle: for every real example alone (batch of one), one forward + ``torch.autograd.grad`` of its mean token loss
over all trainable parameters, joint L2 norm, clip with ``min(1, C / (norm + 1e-6))``, sum. The engine (hooks, one
backward per micro-batch) must give the same clipped sum for every parameter within 1e-4 relative error, and the
same per-sample norms.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers
from torch import nn

from vaultgemma_hf.dp.engine import DPGradientEngine, UnsupportedModuleError

from conftest import tiny_config_kwargs

try:  # our model classes (same parameter names); the built-in one is always tested
    from vaultgemma_hf import VaultGemmaConfig as OurConfig
    from vaultgemma_hf import VaultGemmaForCausalLM as OurModel
except ImportError:  # pragma: no cover - while the foundation is not there yet
    OurConfig = OurModel = None

VOCAB = 97
RTOL = 1e-4
MODEL_KINDS = ["transformers"] + (["vaultgemma_hf"] if OurModel is not None else [])


def make_model(kind: str = "transformers", seed: int = 0, **overrides) -> nn.Module:
    kwargs = tiny_config_kwargs(vocab_size=VOCAB, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if kind == "transformers":
        model = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**kwargs))
    else:
        model = OurModel(OurConfig(**kwargs))
    with torch.no_grad():  # norms are initialised to 0: perturb everything so that no gradient is degenerate
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens (label -100 ignored)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return ce.view(labels.shape).sum(dim=1) / counts


def make_batch(batch: int, seq: int, seed: int, *, pad_inside: bool = False, ignore: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    ids[0, 2] = ids[0, 5]  # repeated token inside a sample
    labels = ids.clone()
    mask = torch.ones(batch, seq, dtype=torch.long)
    if ignore:
        labels[-1, : seq // 2] = -100  # ignore_index labels
    if pad_inside:  # right-padding of one sequence: pad id 0, attention 0, label -100
        ids[0, -3:] = 0
        mask[0, -3:] = 0
        labels[0, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def oracle(model, micro_batches, C, example_masks=None):
    """Slow reference: one forward/backward per real example; joint clip; sum. Returns (sums, norms)."""
    named = trainable(model)
    params = [p for _, p in named]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for k, mb in enumerate(micro_batches):
        for i in range(mb["input_ids"].shape[0]):
            if example_masks is not None and not example_masks[k][i]:
                norms.append(0.0)
                continue
            out = model(input_ids=mb["input_ids"][i : i + 1], attention_mask=mb["attention_mask"][i : i + 1])
            loss = per_example_loss(out.logits, mb["labels"][i : i + 1])[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
            norms.append(norm)
            factor = min(1.0, C / (norm + 1e-6))
            for s, g in zip(sums, grads):
                s.add_(g.double() * factor)
    return {n: s for (n, _), s in zip(named, sums)}, torch.tensor(norms, dtype=torch.float64)


def run_engine(model, micro_batches, C, example_masks=None, engine=None):
    engine = engine or DPGradientEngine(model, C)
    norms = []
    for k, mb in enumerate(micro_batches):
        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
        loss = per_example_loss(out.logits, mb["labels"])
        mask = None if example_masks is None else example_masks[k]
        norms.append(engine.backward(loss, mask))
    for _, p in engine.trainable_parameters:
        assert p.grad is None, "backward must leave p.grad alone"
    engine.finalize_step(noise_multiplier=0.0, expected_batch_size=1.0)
    grads = {n: p.grad.double() for n, p in engine.trainable_parameters}
    engine.detach()
    return grads, torch.cat(norms).double()


def assert_matches(grads, truth, norms, truth_norms):
    assert grads.keys() == truth.keys()
    for name, g in grads.items():
        ref = truth[name]
        err = (g - ref).norm() / ref.norm().clamp_min(1e-30)
        assert err < RTOL, f"{name}: relative error {err:.2e}"
    torch.testing.assert_close(norms, truth_norms, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("C", [1e-3, 1e3], ids=["all_clipped", "no_clipping"])
def test_full_model_tied_embeddings(kind, C):
    model = make_model(kind)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    mbs = [make_batch(4, 12, seed=1)]
    truth, truth_norms = oracle(model, mbs, C)
    assert (truth_norms > C).all() if C < 1 else (truth_norms < C).all()
    grads, norms = run_engine(model, mbs, C)
    assert_matches(grads, truth, norms, truth_norms)
    assert {n for n, _ in trainable(model)} == set(grads)  # every trainable parameter, tied weight once


def test_untied_embeddings_and_biases():
    model = make_model(tie_word_embeddings=False, attention_bias=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # a bias-only trainable linear layer
    mbs = [make_batch(3, 10, seed=2)]
    truth, truth_norms = oracle(model, mbs, C=0.05)
    grads, norms = run_engine(model, mbs, C=0.05)
    assert "model.layers.0.self_attn.q_proj.bias" in grads
    assert "model.layers.0.self_attn.q_proj.weight" not in grads
    assert_matches(grads, truth, norms, truth_norms)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_padding_ignore_index_masked_rows_and_accumulation(kind):
    """Two micro-batches (sizes 4 and 2) accumulated into one step; attention padding inside a sequence,
    ignore_index labels, and padded example rows (example_mask False) that must contribute nothing."""
    model = make_model(kind)
    mbs = [make_batch(4, 12, seed=3, pad_inside=True), make_batch(2, 12, seed=4, pad_inside=True)]
    masks = [torch.tensor([True, False, True, True]), torch.tensor([True, False])]
    C = 0.05
    truth, truth_norms = oracle(model, mbs, C, masks)
    engine = DPGradientEngine(model, C)
    with torch.no_grad():  # an evaluation forward in between is not recorded
        model(input_ids=mbs[0]["input_ids"])
    grads, norms = run_engine(model, mbs, C, masks, engine=engine)
    assert_matches(grads, truth, norms, truth_norms)
    assert norms[1] == 0 and norms[5] == 0


def test_num_accumulated_and_masked_row_with_nan_loss():
    """A padded row whose loss is NaN (0 labelled tokens, no clamp) is excluded without poisoning the sum."""
    model = make_model()
    mb = make_batch(3, 10, seed=5)
    engine = DPGradientEngine(model, 0.1)
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
    labels = mb["labels"].clone()
    labels[1] = -100
    logits, lab = out.logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), lab.reshape(-1), ignore_index=-100, reduction="none")
    loss = ce.view(lab.shape).sum(1) / (lab != -100).sum(1)  # row 1: 0 / 0 = NaN
    assert torch.isnan(loss[1])
    norms = engine.backward(loss, torch.tensor([True, False, True]))
    assert engine.num_accumulated == 2 and norms[1] == 0 and torch.isfinite(norms).all()
    engine.finalize_step(0.0, 1.0)
    grads = {n: p.grad.double() for n, p in engine.trainable_parameters}
    engine.detach()
    keep = [0, 2]
    sub = {k: v[keep] for k, v in mb.items()}
    sub["labels"] = labels[keep]
    truth, truth_norms = oracle(model, [sub], 0.1)
    assert_matches(grads, truth, norms[keep].double(), truth_norms)
    assert engine.num_accumulated == 0


def test_frozen_embeddings_and_norms():
    model = make_model()
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "norm" in name:
            p.requires_grad_(False)
    mbs = [make_batch(3, 12, seed=6, pad_inside=True)]
    truth, truth_norms = oracle(model, mbs, C=0.02)
    grads, norms = run_engine(model, mbs, C=0.02)
    assert not any("embed" in n or "norm" in n for n in grads)
    assert_matches(grads, truth, norms, truth_norms)


def test_frozen_lower_layers():
    model = make_model(num_hidden_layers=3, layer_types=["full_attention"] * 3)
    for name, p in model.named_parameters():
        if "embed_tokens" in name or ".layers.0." in name or ".layers.1." in name:
            p.requires_grad_(False)
    mbs = [make_batch(3, 10, seed=7)]
    truth, truth_norms = oracle(model, mbs, C=0.02)
    grads, norms = run_engine(model, mbs, C=0.02)
    assert all(".layers.2." in n or n == "model.norm.weight" for n in grads)
    assert_matches(grads, truth, norms, truth_norms)


def test_peft_lora():
    peft = pytest.importorskip("peft")
    base = make_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # LoRA B starts at zero: perturb so that every adapter has a gradient
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    names = [n for n, _ in trainable(model)]
    assert names and all("lora_" in n for n in names)
    mbs = [make_batch(3, 10, seed=8, pad_inside=True)]
    truth, truth_norms = oracle(model, mbs, C=0.01)
    grads, norms = run_engine(model, mbs, C=0.01)
    assert_matches(grads, truth, norms, truth_norms)


def test_bf16_autocast_cpu_runs_in_fp32():
    """Under bf16 autocast the norms and accumulators stay float32 and agree with the slow loop run under the
    same autocast (loose tolerance: the slow loop's own weight gradients are rounded to bf16)."""
    model = make_model()
    mbs = [make_batch(3, 10, seed=9)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        truth, truth_norms = oracle(model, mbs, C=0.05)
        engine = DPGradientEngine(model, 0.05)
        out = model(input_ids=mbs[0]["input_ids"], attention_mask=mbs[0]["attention_mask"])
        assert out.logits.dtype == torch.bfloat16
        norms = engine.backward(per_example_loss(out.logits, mbs[0]["labels"]))
    assert norms.dtype == torch.float32
    assert all(acc.dtype == torch.float32 for acc in engine._acc.values())
    engine.finalize_step(0.0, 1.0)
    torch.testing.assert_close(norms.double(), truth_norms, rtol=2e-2, atol=0)
    for name, p in engine.trainable_parameters:
        assert p.grad.dtype == torch.float32
        err = (p.grad.double() - truth[name]).norm() / truth[name].norm()
        assert err < 5e-2, f"{name}: {err:.2e}"
    exact = {name: p.grad.clone() for name, p in engine.trainable_parameters}
    engine.detach()
    # factors folded into the bf16 output gradients (one matmul per layer): same up to bf16 rounding
    engine = DPGradientEngine(model, 0.05, exact_scaling=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=mbs[0]["input_ids"], attention_mask=mbs[0]["attention_mask"])
        engine.backward(per_example_loss(out.logits, mbs[0]["labels"]))
    engine.finalize_step(0.0, 1.0)
    for name, p in engine.trainable_parameters:
        assert (p.grad - exact[name]).norm() / exact[name].norm() < 1e-2, name
    engine.detach()


class _Gate(nn.Module):
    """A learnable scalar gate: its parameter broadcasts, so the generic rule's batched fast path applies."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x)


class _ZooModel(nn.Module):
    """Not a transformer: modules reused within one forward (shared weights with several uses), LayerNorm (the
    generic rule's vmap path), a scalar gate, biases, 2-D inputs and a tied embedding / head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.norm = nn.LayerNorm(16)
        self.shared = nn.Linear(16, 16)
        self.gate = _Gate()
        self.pool = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) + 0.5 * self.emb(input_ids.flip(1))  # embedding used twice
        h = self.norm(self.shared(self.gate(h)))
        h = self.norm(h + self.shared(h))  # Linear, LayerNorm and gate weights used twice
        pooled = self.pool(h.mean(dim=1))  # [B, d] input
        return self.head(h + pooled[:, None, :])


def test_generic_modules_and_multi_use_weights():
    torch.manual_seed(0)
    model = _ZooModel()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mbs = [make_batch(3, 9, seed=14, pad_inside=True), make_batch(3, 9, seed=15)]
    named = trainable(model)
    C = 0.3
    truth = [torch.zeros_like(p, dtype=torch.float64) for _, p in named]
    truth_norms = []
    for mb in mbs:
        for i in range(3):
            loss = per_example_loss(model(mb["input_ids"][i : i + 1]), mb["labels"][i : i + 1])[0]
            grads = torch.autograd.grad(loss, [p for _, p in named])
            norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
            truth_norms.append(norm)
            for t, g in zip(truth, grads):
                t.add_(g.double() * min(1.0, C / (norm + 1e-6)))
    engine = DPGradientEngine(model, C)
    rules = {d["module"]: d["rule"] for d in engine.describe()}
    assert rules == {
        "emb": "embedding",
        "norm": "generic",
        "shared": "linear",
        "gate": "generic",
        "pool": "linear",
        "head": "linear",
    }
    norms = []
    for mb in mbs:  # the second backward uses the generic fast path where it was validated
        norms.append(engine.backward(per_example_loss(model(mb["input_ids"]), mb["labels"])))
    by_module = {rule.name: rule for rule in engine._rules}
    assert by_module["gate"].fast is True and by_module["norm"].fast is False
    engine.finalize_step(0.0, 1.0)
    grads = {n: p.grad.double() for n, p in engine.trainable_parameters}
    assert_matches(
        grads,
        {n: t for (n, _), t in zip(named, truth)},
        torch.cat(norms).double(),
        torch.tensor(truth_norms, dtype=torch.float64),
    )
    engine.detach()


def test_tied_head_with_materialised_per_sample_gradients():
    """Long sequences on a tiny vocabulary: the head's per-sample gradients are kept materialised and the tied
    cross term is taken from them."""
    model = make_model(num_hidden_layers=1, layer_types=["full_attention"])
    mbs = [make_batch(2, 40, seed=16)]
    truth, truth_norms = oracle(model, mbs, C=0.05)
    grads, norms = run_engine(model, mbs, C=0.05)
    assert_matches(grads, truth, norms, truth_norms)


# ------------------------------------------------------------------------------------------------ noise


def test_noise_statistics_and_sigma_zero_exact():
    model = make_model()
    C, sigma, L = 0.5, 2.0, 8.0
    engine = DPGradientEngine(model, C)
    engine.finalize_step(sigma, L, generator=torch.Generator().manual_seed(0))  # empty batch: noise only
    noise = torch.cat([p.grad.flatten() for _, p in engine.trainable_parameters])
    assert all(p.grad.dtype == torch.float32 for _, p in engine.trainable_parameters)
    expected = sigma * C / L
    n = noise.numel()
    # std of the sample std is ~ expected / sqrt(2n); allow 6 of them
    assert abs(noise.std().item() - expected) < 6 * expected / (2 * n) ** 0.5
    assert abs(noise.mean().item()) < 6 * expected / n**0.5
    # same seed, same noise; different seed, different noise
    engine.finalize_step(sigma, L, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cat([p.grad.flatten() for _, p in engine.trainable_parameters]), noise)
    engine.finalize_step(sigma, L, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(torch.cat([p.grad.flatten() for _, p in engine.trainable_parameters]), noise)
    engine.finalize_step(sigma, L)  # default: OS-seeded generator
    # sigma = 0: exactly the clipped sum / expected batch size
    mb = make_batch(3, 10, seed=10)
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
    engine.backward(per_example_loss(out.logits, mb["labels"]))
    sums = {k: v.clone() for k, v in engine._acc.items()}
    engine.finalize_step(0.0, 3.0)
    for _, p in engine.trainable_parameters:
        assert torch.equal(p.grad, sums[id(p)] / 3.0)
    engine.detach()


def test_noise_added_to_clipped_sum_has_right_std():
    """With a real clipped sum, grad - sum/L has std sigma*C/L."""
    model = make_model()
    C, sigma, L = 0.1, 1.0, 4.0
    engine = DPGradientEngine(model, C)
    mb = make_batch(2, 8, seed=11)
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
    engine.backward(per_example_loss(out.logits, mb["labels"]))
    sums = {k: v.clone() for k, v in engine._acc.items()}
    engine.finalize_step(sigma, L, generator=torch.Generator().manual_seed(3))
    resid = torch.cat([(p.grad - sums[id(p)] / L).flatten() for _, p in engine.trainable_parameters])
    expected = sigma * C / L
    assert abs(resid.std().item() - expected) < 6 * expected / (2 * resid.numel()) ** 0.5
    engine.detach()


def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = make_model()
        mb = make_batch(4, 10, seed=12)
        shard = {k: v[rank::world] for k, v in mb.items()}
        engine = DPGradientEngine(model, 0.05)
        out = model(input_ids=shard["input_ids"], attention_mask=shard["attention_mask"])
        engine.backward(per_example_loss(out.logits, shard["labels"]))
        engine.finalize_step(0.0, 4.0)
        clipped = {n: p.grad.clone() for n, p in engine.trainable_parameters}
        # noise only, the generator seeded differently per rank: only rank 0's noise may appear, once
        engine.finalize_step(1.0, 2.0, generator=torch.Generator().manual_seed(100 + rank))
        noisy = {n: p.grad.clone() for n, p in engine.trainable_parameters}
        torch.save({"clipped": clipped, "noisy": noisy}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_sum_and_noise_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as path:
        # fork: children inherit the imported modules (spawn would re-import transformers in each, ~30 s)
        mp.start_processes(_ddp_worker, args=(2, port, path), nprocs=2, join=True, start_method="fork")
        results = [torch.load(f"{path}/rank{r}.pt") for r in range(2)]
    model = make_model()
    mb = make_batch(4, 10, seed=12)
    single, _ = run_engine(model, [mb], 0.05)
    engine = DPGradientEngine(model, 0.05)
    engine.finalize_step(1.0, 2.0, generator=torch.Generator().manual_seed(100))
    rank0_noise = {n: p.grad.clone() for n, p in engine.trainable_parameters}
    for res in results:
        for name, g in res["clipped"].items():
            torch.testing.assert_close(g.double(), single[name] / 4.0, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(res["noisy"][name], rank0_noise[name])


# ----------------------------------------------------------------------------------------------- errors


class _FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.proj(x), self.w)


class _ReachAround(nn.Module):
    """Uses its child's bias in its own forward: gradient reaches the parameter outside the child's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.inner.bias


class _NotALinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 2.0


def test_unsupported_trainable_conv_names_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(torch\.nn\.modules\.conv\.Conv1d\)"):
        DPGradientEngine(model, 1.0)
    model[1].requires_grad_(False)  # frozen: fine
    DPGradientEngine(model, 1.0).detach()


def test_batchnorm_is_refused_even_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match="'1' \\(BatchNorm1d\\).*batch statistics"):
        DPGradientEngine(model, 1.0)


def test_unsupported_functional_parameter_names_module():
    model = nn.Sequential(_FunctionalHead())
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(.*_FunctionalHead\).*w \(4, 4\)"):
        DPGradientEngine(model, 1.0)


def test_gradient_outside_module_forward_is_refused():
    model = _ReachAround()
    engine = DPGradientEngine(model, 1.0)
    with pytest.raises(UnsupportedModuleError, match=r"'inner\.bias'.*outside the forward"):
        engine.backward(model(torch.randn(3, 2, 4)).pow(2).sum(dim=(1, 2)))
    engine.detach()


def test_linear_subclass_with_other_forward_is_refused():
    engine = DPGradientEngine(nn.Sequential(_NotALinear(4, 4)), 1.0)
    with pytest.raises(UnsupportedModuleError, match="_NotALinear"):
        engine.model(torch.randn(2, 4))
    engine.detach()


def test_plain_backward_with_engine_attached_is_refused_and_detach_restores():
    model = make_model()
    mb = make_batch(2, 8, seed=13)
    engine = DPGradientEngine(model, 1.0)
    loss = per_example_loss(model(input_ids=mb["input_ids"]).logits, mb["labels"])
    with pytest.raises(RuntimeError, match="engine.backward"):
        loss.sum().backward()
    with pytest.raises(ValueError, match="1-D"):
        engine.backward(loss.sum())
    with pytest.raises(ValueError, match="example_mask"):
        engine.backward(loss, torch.ones(3, dtype=torch.bool))
    engine.detach()
    with pytest.raises(RuntimeError, match="detached"):
        engine.finalize_step(0.0, 1.0)
    loss = per_example_loss(model(input_ids=mb["input_ids"]).logits, mb["labels"])
    loss.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPGradientEngine(model, 0.0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        DPGradientEngine(model, 1.0)
    model.requires_grad_(True)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    with pytest.raises(ValueError, match="checkpointing"):
        DPGradientEngine(model, 1.0)
    disable()
    engine = DPGradientEngine(model, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        engine.finalize_step(-1.0, 1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        engine.finalize_step(1.0, 0.0)
    engine.detach()

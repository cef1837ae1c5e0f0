"""DPGradientEngine on other model families, PEFT variants and adversarial-but-real usage, against slow oracles.

Two oracles (both clip each sample's joint gradient over all trainable parameters with ``min(1, C / (norm + 1e-6))``
and sum in float64):

* per example: one forward + backward per sequence (deterministic models);
* same forward: one batched forward and ``autograd.grad`` of each sample's loss (``retain_graph``), so that models
  with dropout see the same masks as the engine's forward when both are run from the same RNG seed.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from vaultgemma_hf.dp.engine import DPGradientEngine, UnsupportedModuleError

from conftest import tiny_config_kwargs

VOCAB = 61
RTOL = 1e-4


# -------------------------------------------------------------------------------------------------- helpers


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens (label -100 ignored)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return ce.view(labels.shape).sum(dim=1) / counts


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_example_loss(out.logits, batch["labels"])


def make_batch(batch: int = 3, seq: int = 9, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    mask = torch.ones(batch, seq, dtype=torch.long)
    ids[0, -2:], mask[0, -2:], labels[0, -2:] = 0, 0, -100  # right padding
    labels[-1, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _clip_sum(model: nn.Module, per_sample_grads, C: float):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    norms = []
    for grads in per_sample_grads:
        grads = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(grads, named)]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        norms.append(norm)
        for (n, _), g in zip(named, grads):
            sums[n].add_(g.double() * min(1.0, C / (norm + 1e-6)))
    return sums, torch.tensor(norms, dtype=torch.float64)


def oracle_per_example(model: nn.Module, loss_fn, batch: dict, C: float):
    params = [p for p in model.parameters() if p.requires_grad]
    size = batch["input_ids"].shape[0]

    def grads():
        for i in range(size):
            loss = loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()})[0]
            yield torch.autograd.grad(loss, params, allow_unused=True)

    return _clip_sum(model, grads(), C)


def oracle_same_forward(model: nn.Module, loss_fn, batch: dict, C: float, seed: int):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    grads = (torch.autograd.grad(loss[i], params, allow_unused=True, retain_graph=True) for i in range(len(loss)))
    return _clip_sum(model, grads, C)


def run_engine(model: nn.Module, loss_fn, batch: dict, C: float, *, seed: int | None = None, **engine_kwargs):
    engine = DPGradientEngine(model, C, **engine_kwargs)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        norms = engine.backward(loss_fn(model, batch))
        engine.finalize_step(0.0, 1.0)
        grads = {n: p.grad.double() for n, p in engine.trainable_parameters}
        for _, p in engine.trainable_parameters:
            p.grad = None
    finally:
        engine.detach()
    return grads, norms.double()


def max_rel_err(grads: dict, truth: dict) -> float:
    assert grads.keys() == truth.keys()
    return max(((grads[n] - t).norm() / t.norm().clamp_min(1e-30)).item() for n, t in truth.items())


def assert_matches(grads, truth, norms, truth_norms, rtol: float = RTOL) -> None:
    err = max_rel_err(grads, truth)
    assert err < rtol, f"max relative error {err:.2e}"
    torch.testing.assert_close(norms, truth_norms, rtol=rtol, atol=1e-7)


def perturbed(model: nn.Module, scale: float = 0.05) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model.train()


_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    use_cache=False,
)


def hf_model(family: str, attn: str = "eager", **overrides) -> nn.Module:
    classes = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
        "gemma2": (
            transformers.Gemma2ForCausalLM,
            transformers.Gemma2Config,
            dict(
                final_logit_softcapping=5.0,
                attn_logit_softcapping=10.0,
                query_pre_attn_scalar=8,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
            ),
        ),
    }
    cls, config_cls, extra = classes[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(0)
    return perturbed(cls(config))


def vaultgemma(**overrides) -> nn.Module:
    kwargs = tiny_config_kwargs(vocab_size=VOCAB, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return perturbed(transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**kwargs)))


# ---------------------------------------------------------------------------------------- model families


@pytest.mark.parametrize(
    "family, attn, overrides",
    [
        ("llama", "sdpa", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
        ("qwen2", "sdpa", dict(tie_word_embeddings=False)),  # q/k/v biases, untied head
        ("gemma2", "eager", {}),  # logit soft-capping, sliding window, scaled embeddings, tied head
    ],
)
def test_transformers_families_match_oracle(family, attn, overrides):
    model = hf_model(family, attn, **overrides)
    batch = make_batch()
    truth, truth_norms = oracle_per_example(model, lm_loss, batch, C=0.05)
    grads, norms = run_engine(model, lm_loss, batch, C=0.05)
    assert_matches(grads, truth, norms, truth_norms)


def test_layer_shared_across_depth():
    """One decoder layer used at two depths: every Linear and norm in it has two uses per forward."""
    model = hf_model("llama", "sdpa", num_hidden_layers=3)
    model.model.layers[2] = model.model.layers[0]
    batch = make_batch()
    truth, truth_norms = oracle_per_example(model, lm_loss, batch, C=0.05)
    grads, norms = run_engine(model, lm_loss, batch, C=0.05)
    assert_matches(grads, truth, norms, truth_norms)


def test_dropout_in_train_mode_is_per_sample():
    """Attention dropout (functional, no parameters) and PEFT LoRA dropout: the engine's per-sample gradients are
    those of the forward it recorded (same dropout masks as the same-forward oracle)."""
    peft = pytest.importorskip("peft")
    base = hf_model("llama", "eager", attention_dropout=0.3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.3)
    model = perturbed(peft.get_peft_model(base, config), 0.1)
    batch = make_batch()
    truth, truth_norms = oracle_same_forward(copy.deepcopy(model), lm_loss, batch, C=0.05, seed=3)
    grads, norms = run_engine(model, lm_loss, batch, C=0.05, seed=3)
    assert_matches(grads, truth, norms, truth_norms)


def test_peft_dora_with_dropout():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, lora_dropout=0.3)
    model = perturbed(peft.get_peft_model(hf_model("llama", "sdpa", num_hidden_layers=1), config), 0.1)
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = make_batch()
    truth, truth_norms = oracle_same_forward(copy.deepcopy(model), lm_loss, batch, C=0.05, seed=4)
    grads, norms = run_engine(model, lm_loss, batch, C=0.05, seed=4)
    assert_matches(grads, truth, norms, truth_norms)


@pytest.mark.parametrize(
    "make_config, match",
    [
        (lambda peft: peft.LoraConfig(r=4, target_modules=["embed_tokens"]), r"embed_tokens\.lora_embedding_A"),
        (
            lambda peft: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            r"k_proj\.ia3_l",
        ),
        (lambda peft: peft.VeraConfig(r=4, target_modules=["q_proj"]), r"q_proj\.vera_lambda_"),
    ],
    ids=["lora_embedding", "ia3", "vera"],
)
def test_unsupported_peft_adapters_are_refused_by_name(make_config, match):
    peft = pytest.importorskip("peft")
    model = perturbed(peft.get_peft_model(hf_model("llama", "sdpa", num_hidden_layers=1), make_config(peft)), 0.1)
    with pytest.raises(UnsupportedModuleError, match=match):
        engine = DPGradientEngine(model, 1.0)
        try:
            engine.backward(lm_loss(model, make_batch()))
        finally:
            engine.detach()


def test_inputs_embeds_batch_of_one_and_fully_ignored_row():
    model = vaultgemma()

    def embeds_loss(m: nn.Module, batch: dict) -> torch.Tensor:
        embeds = m.get_input_embeddings()(batch["input_ids"])  # tied embedding used outside the model's forward
        return per_example_loss(
            m(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )

    batch = make_batch()
    batch["labels"][1] = -100  # no labelled token: zero gradient, norm 0
    truth, truth_norms = oracle_per_example(model, embeds_loss, batch, C=0.05)
    grads, norms = run_engine(model, embeds_loss, batch, C=0.05)
    assert_matches(grads, truth, norms, truth_norms)
    assert norms[1] == 0
    single = {k: v[:1] for k, v in batch.items()}
    truth, truth_norms = oracle_per_example(model, lm_loss, single, C=0.05)
    grads, norms = run_engine(model, lm_loss, single, C=0.05)
    assert_matches(grads, truth, norms, truth_norms)


def test_no_grad_forward_is_not_recorded_and_detach_leaves_nothing_behind():
    model = vaultgemma()
    batch = make_batch()
    engine = DPGradientEngine(model, 1.0)
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    with torch.inference_mode():
        model(input_ids=batch["input_ids"])
    assert engine._calls == [] and all(p.requires_grad for p in model.parameters())
    out = model(input_ids=batch["input_ids"])  # recorded, never backpropagated
    assert engine._calls
    engine.detach()
    del out
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )
    assert hooks == 0 and all(not p._backward_hooks for p in model.parameters())
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None, "the detached engine must not be kept alive by the model"
    per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------- defects fixed


class _InPlaceAfterUse(nn.Module):
    """A Linear whose input is modified in place after the Linear read it (plain autograd would refuse this)."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.a = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)
        self.inplace = inplace
        self.where = "linear"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> _Out:
        x = self.emb(input_ids) * 1.0
        if self.where == "generic":
            h = self.a(self.norm(x))
        else:
            h = self.a(x)
        if self.inplace and self.where != "embedding":
            x.mul_(2.0)
        else:
            x = x * 2.0
        out = _Out(self.head(torch.tanh(h) + x))
        if self.where == "embedding" and self.inplace:
            input_ids.add_(1).remainder_(VOCAB)  # ids reused as a buffer after the forward
        return out


@pytest.mark.parametrize("where", ["linear", "generic", "embedding"])
def test_input_modified_in_place_after_forward_is_refused(where):
    """Defect: with the module's weights switched off, autograd did not save its input, so an in-place update
    after the forward went unnoticed and the engine used the modified input (linear: 100% error on a.weight)."""
    torch.manual_seed(0)
    model = _InPlaceAfterUse()
    model.where = where
    reference = copy.deepcopy(model)
    reference.inplace = False
    batch = make_batch()
    truth, truth_norms = oracle_per_example(reference, lm_loss, batch, C=1e3)
    grads, norms = run_engine(reference, lm_loss, batch, C=1e3)  # the out-of-place model is exact
    assert_matches(grads, truth, norms, truth_norms)
    module = {"linear": "a", "generic": "norm", "embedding": "emb"}[where]
    engine = DPGradientEngine(model, 1e3)
    ids = batch["input_ids"].clone()
    loss = per_example_loss(model(input_ids=ids).logits, batch["labels"])
    with pytest.raises(UnsupportedModuleError, match=rf"'{module}' .*modified in place"):
        engine.backward(loss)
    engine.detach()


class _LayerScaleDropout(nn.Module):
    """Owns a trainable vector and applies dropout in its own forward (generic rule)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x * self.gamma)


class _DropoutModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.scale = _LayerScaleDropout(16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> _Out:
        return _Out(self.head(self.scale(self.emb(input_ids))))


def test_generic_fast_path_is_validated_per_train_eval_state():
    """Defect: the generic rule validated its batched fast path once, in eval mode, then used it in train mode,
    recomputing the module with a fresh dropout mask (ls.gamma 72% off the same-forward oracle, silently)."""
    torch.manual_seed(0)
    model = _DropoutModel().eval()
    batch = make_batch()
    truth, truth_norms = oracle_per_example(model, lm_loss, batch, C=1e3)  # eval: deterministic, exact
    engine = DPGradientEngine(model, 1e3)
    norms = engine.backward(lm_loss(model, batch))
    engine.finalize_step(0.0, 1.0)
    assert_matches({n: p.grad.double() for n, p in engine.trainable_parameters}, truth, norms.double(), truth_norms)
    assert engine._rules[1].fast is True
    model.train()  # dropout inside the module: its forward cannot be replayed per sample
    assert engine._rules[1].fast is None
    with pytest.raises(UnsupportedModuleError, match=r"'scale' .*random"):
        engine.backward(lm_loss(model, batch))
    # the recorded train/eval state is replayed: a train forward backpropagated in eval mode is refused too
    loss = lm_loss(model, batch)
    model.eval()
    with pytest.raises(UnsupportedModuleError, match=r"'scale' .*random"):
        engine.backward(loss)
    engine.detach()


class _NormalizedScale(nn.Module):
    """Weight-normalised layer scale ``x * g / ||g||``: the norm reduces over the fast path's per-sample copies,
    so the fast path is wrong, and only a non-zero comparison with vmap can tell."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g / self.g.norm()


class _ReZeroModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.scale = _NormalizedScale(16)
        self.gate = _Gate()  # ReZero gate: zero at init
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> _Out:
        x = self.emb(input_ids)
        return _Out(self.head(self.gate(x, torch.tanh(self.scale(x)))))


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * h


def test_generic_fast_path_is_not_validated_on_zero_gradients():
    """Defect: with a zero-initialised gate upstream the module's first per-sample gradients are all zero; the
    wrong fast path matched them and was used for good (g off by far more than RTOL afterwards)."""
    torch.manual_seed(0)
    model = _ReZeroModel()
    with torch.no_grad():
        model.scale.g.add_(0.3 * torch.randn(16))
    batch = make_batch()
    reference = copy.deepcopy(model)  # the oracle runs on a copy without the engine's hooks
    engine = DPGradientEngine(model, 1e3)
    engine.backward(lm_loss(model, batch))  # alpha = 0: the scale's gradients are all zero
    engine.zero_accumulator()
    assert engine._rules[1].fast is None
    with torch.no_grad():
        model.gate.alpha.fill_(0.7)
        reference.gate.alpha.fill_(0.7)
    truth, truth_norms = oracle_per_example(reference, lm_loss, batch, C=1e3)
    norms = engine.backward(lm_loss(model, batch))
    engine.finalize_step(0.0, 1.0)
    grads = {n: p.grad.double() for n, p in engine.trainable_parameters}
    engine.detach()
    assert_matches(grads, truth, norms.double(), truth_norms)


def test_float64_model_norms_keep_float64_precision():
    """Defect: per-sample norms of a float64 model were summed in float32 (1e-7 relative error in norms and
    clipping factors, against 1e-16 for the gradients)."""
    model = vaultgemma().double()
    batch = make_batch()
    truth, truth_norms = oracle_per_example(model, lm_loss, batch, C=0.05)
    grads, norms = run_engine(model, lm_loss, batch, C=0.05)
    assert norms.dtype == torch.float64
    assert_matches(grads, truth, norms, truth_norms, rtol=1e-10)


def test_huge_gradients_are_refused_with_the_float64_remedy():
    """Norms above ~1.8e19 overflow when squared in float32: refused (nothing accumulated) with a message that
    points to norm_dtype=torch.float64, which then matches the oracle."""
    model = vaultgemma()
    batch = make_batch()

    def huge(m: nn.Module, b: dict) -> torch.Tensor:
        return lm_loss(m, b) * 1e20

    truth, truth_norms = oracle_per_example(model, huge, batch, C=0.05)
    assert (truth_norms > 1e20).all() and (truth_norms < 1e30).all()
    with pytest.raises(ValueError, match=r"norm_dtype=torch\.float64"):
        run_engine(model, huge, batch, C=0.05)
    grads, norms = run_engine(model, huge, batch, C=0.05, norm_dtype=torch.float64)
    assert_matches(grads, truth, norms, truth_norms)

"""The DP engine's trainable set is fixed at construction: later (un)freezing is refused, never silently applied.

A parameter made trainable after the engine was built would get its raw, unclipped, un-noised gradient from autograd
and the optimizer would apply it; one frozen afterwards used to be switched back on by the engine after each forward.
Both must be clear errors before anything is applied, and a gradient on a parameter the engine does not manage must
never survive ``finalize_step``.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from vaultgemma_hf.data.packing import DataCollatorForPackedSequences, pack_documents
from vaultgemma_hf.dp.engine import DPGradientEngine
from vaultgemma_hf.trainer import DPTrainer, DPTrainingArguments

from conftest import tiny_config_kwargs

VOCAB = 97


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**tiny_config_kwargs(vocab_size=VOCAB)))
    with torch.no_grad():  # norms start at 0: perturb so that every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return ce.view(labels.shape).mean(dim=1)


def micro_batch(seed: int, batch: int = 3, seq: int = 10) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def forward_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return per_example_loss(model(input_ids=ids).logits, ids)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_unfreezing_after_construction_is_refused_before_any_unclipped_gradient():
    model = make_model()
    norm = model.model.norm.weight
    norm.requires_grad_(False)
    engine = DPGradientEngine(model, 1.0)
    norm.requires_grad_(True)  # e.g. gradual unfreezing in a callback
    loss = forward_loss(model, micro_batch(1))
    with pytest.raises(RuntimeError, match=r"made trainable.*unclipped.*: model\.norm\.weight\..*engine\.detach\(\)"):
        engine.backward(loss)
    assert grads_of(model) == {}, "no gradient, least of all the raw one, may reach p.grad"
    assert engine.num_accumulated == 0
    with pytest.raises(RuntimeError, match=r"model\.norm\.weight"):
        engine.finalize_step(1.0, 3.0)
    assert grads_of(model) == {}

    # what the message says to do: rebuild the engine after changing the trainable set
    engine.detach()
    engine = DPGradientEngine(model, 1.0)
    engine.backward(forward_loss(model, micro_batch(1)))
    engine.finalize_step(0.0, 3.0)
    assert norm.grad is not None and set(grads_of(model)) == {n for n, _ in engine.trainable_parameters}
    engine.detach()


def test_freezing_after_construction_is_refused_and_not_undone():
    model = make_model()
    embed = model.model.embed_tokens.weight
    engine = DPGradientEngine(model, 1.0)
    embed.requires_grad_(False)
    loss = forward_loss(model, micro_batch(2))
    assert embed.requires_grad is False, "the engine's forward switching must not unfreeze a frozen parameter"
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    with pytest.raises(RuntimeError, match=r"frozen \(requires_grad=False\).*: model\.embed_tokens\.weight\."):
        engine.backward(loss)
    with pytest.raises(RuntimeError, match=r"model\.embed_tokens\.weight"):
        engine.finalize_step(1.0, 3.0)
    assert grads_of(model) == {}
    engine.detach()
    assert embed.requires_grad is False


def _trainer(model: nn.Module, tmp_path, sigma: float) -> DPTrainer:
    docs = [[5 + i] * 15 for i in range(20)]
    dataset = pack_documents(docs, seq_len=16, eos_token_id=1, cross_document_boundaries=False)
    args = DPTrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        save_strategy="no",
        noise_multiplier=sigma,
        target_delta=1e-3,
        logical_batch_size=4,
        per_device_train_batch_size=4,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
    )
    return DPTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences())


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_trainer_refuses_a_trainable_set_changed_after_construction(tmp_path, change):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**tiny_config_kwargs()))
    target = model.model.norm.weight if change == "unfreeze" else model.model.embed_tokens.weight
    if change == "unfreeze":
        target.requires_grad_(False)
    trainer = _trainer(model, tmp_path, sigma=1e6)
    target.requires_grad_(change == "unfreeze")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "model.norm.weight" if change == "unfreeze" else "model.embed_tokens.weight"
    with pytest.raises(RuntimeError, match=rf"trainable parameter set changed.*{name}"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "no parameter may be updated"
    assert target.requires_grad is (change == "unfreeze"), "the user's requires_grad must be kept"


def test_normal_use_is_unchanged_and_the_check_is_cheap():
    model = make_model()
    frozen = {n for n, p in model.named_parameters() if ".layers.0." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    state = {n: p.requires_grad for n, p in model.named_parameters()}
    engine = DPGradientEngine(model, 1.0)

    # the engine's own switching inside a module forward is not a change of the trainable set
    seen = []
    q_proj = model.model.layers[1].self_attn.q_proj

    def inside_forward(module: nn.Module, args: tuple) -> None:
        seen.append(module.weight.requires_grad)
        engine._check_trainable_set()

    handle = q_proj.register_forward_pre_hook(inside_forward)  # runs after the engine's pre-hook

    step_times = []
    for step in range(3):
        start = time.perf_counter()
        engine.backward(forward_loss(model, micro_batch(10 + step)))
        engine.finalize_step(1.0, 3.0)
        step_times.append(time.perf_counter() - start)
        assert {n for n, p in model.named_parameters() if p.grad is not None} == set(state) - frozen
        assert {n: p.requires_grad for n, p in model.named_parameters()} == state
        model.zero_grad()
    handle.remove()
    assert seen == [False] * 3, "the hook must have run inside the engine's switched-off window"

    def check_cost() -> float:
        start = time.perf_counter()
        engine._check_trainable_set()  # once per micro-batch
        engine._check_stray_gradients()  # once per logical step
        return time.perf_counter() - start

    cost = statistics.median(check_cost() for _ in range(200))
    assert cost < 0.01 * statistics.median(step_times), (cost, step_times)
    engine.detach()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == state


def test_gradient_of_a_parameter_added_after_construction_is_refused_in_finalize():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    engine = DPGradientEngine(model, 1.0)
    model[1] = nn.Linear(4, 4)  # replaced after the engine was built: not hooked, not clipped
    engine.backward(model(torch.randn(3, 4)).pow(2).sum(dim=1))
    assert model[1].weight.grad is not None  # autograd's raw gradient, the hazard
    with pytest.raises(RuntimeError, match=r"not managed.*: 1\.weight \(requires_grad=True\), 1\.bias .*clipping"):
        engine.finalize_step(1.0, 3.0)
    assert model[0].weight.grad is None and model[0].bias.grad is None, "nothing may be written for the step"
    engine.detach()


def test_stale_gradient_on_a_frozen_parameter_is_refused_in_finalize():
    model = make_model()
    norm = model.model.norm.weight
    norm.requires_grad_(False)
    engine = DPGradientEngine(model, 1.0)
    norm.grad = torch.ones_like(norm)  # e.g. left over from a non-private backward; an optimizer holding it applies it
    engine.backward(forward_loss(model, micro_batch(3)))
    with pytest.raises(RuntimeError, match=r"model\.norm\.weight \(requires_grad=False\).*p\.grad = None"):
        engine.finalize_step(1.0, 3.0)
    norm.grad = None
    engine.finalize_step(1.0, 3.0)
    engine.detach()

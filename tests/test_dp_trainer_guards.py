"""DPTrainer guards against what would weaken or misreport the guarantee (merged rows, half-finished steps,
changed privacy parameters, card rounding, testing flags, retraining on the same data); each fails without its fix.

Oracles: a slow per-example loop (one backward per sequence, HF loss, joint clipping), hand-built `dp_accounting`
events, and the exact values behind the model card's printed numbers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch
from transformers import DataCollatorWithFlattening, TrainerCallback

from test_dp_trainer import (
    args_for,
    clipped_sum_oracle,
    first_logical_batch,
    make_dataset,
    make_model,
    poisson_pld_epsilon,
)
from vaultgemma_hf.data.packing import DataCollatorForPackedSequences
from vaultgemma_hf.trainer import DP_STATE_NAME, DPTrainer
from vaultgemma_hf.trainer.batching import MaskedCollator, check_rows
from vaultgemma_hf.trainer.model_card import DPTrainingSummary, render_model_card


# ------------------------------------------------------------------------------ a collator merging examples
def test_collator_that_merges_examples_is_refused(tmp_path, tiny_kwargs):
    """DataCollatorWithFlattening puts a micro-batch into ONE row. Before the fix, with micro-batches larger than
    per_device_train_batch_size (=1) the merged row was clipped as one sample and fed to every chunk, so each sampled
    sequence entered up to |micro-batch| clipped gradients (sensitivity |micro-batch| x C instead of C)."""
    dataset = make_dataset(num_docs=40, seq_len=8)
    args = args_for(
        tmp_path,
        noise_multiplier=1.0,
        logical_batch_size=3,
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=0.0,
        deterministic_noise_for_testing=True,
        seed=3,
    )
    assert len(first_logical_batch(args, len(dataset))) > 1, "pick a seed whose first batch has >= 2 sequences"
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset,
        data_collator=DataCollatorWithFlattening(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="one row per example"):
        trainer.train()
    assert trainer.privacy_accountant.steps == 0


def test_check_rows_and_masked_collator():
    dataset = make_dataset(num_docs=6, seq_len=8)
    pairs = [(dataset[i], True) for i in range(3)]
    batch = MaskedCollator(DataCollatorForPackedSequences(), dataset[0])(pairs)  # one row per example: accepted
    assert batch["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match=r"input_ids \(1, 24\)"):
        MaskedCollator(DataCollatorWithFlattening(), dataset[0])(pairs)
    check_rows({"input_ids": torch.zeros(2, 4), "scalar": torch.tensor(1.0), "other": [1]}, 2)
    with pytest.raises(ValueError, match="position_ids"):
        check_rows({"input_ids": torch.zeros(2, 4), "position_ids": torch.zeros(1, 8)}, 2)


# ------------------------------------------------------------------- a step interrupted in the middle
class _InterruptOnce(TrainerCallback):
    def __init__(self) -> None:
        self.armed = True

    def on_substep_end(self, args, state, control, **kwargs):
        if self.armed:  # after the first of two micro-batches: half a logical step is accumulated
            self.armed = False
            raise KeyboardInterrupt


class _CaptureGrads(TrainerCallback):
    def __init__(self, model) -> None:
        self.model = model
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def test_interrupted_logical_step_is_not_carried_into_the_next_train(tmp_path, tiny_kwargs):
    """train() interrupted after one of two micro-batches left that half step's clipped sums in the engine; the next
    train() added them to its first step: a second Poisson draw (here the same sequences again) in one noisy
    release that the accountant counts as one draw. Oracle: the first update of the second train() equals the
    slow per-example clipped sum of its own batch / L (σ = 0, so the comparison is exact)."""
    dataset = make_dataset(num_docs=24)
    args = args_for(
        tmp_path,
        noise_multiplier=0.0,
        per_sample_max_grad_norm=0.5,
        logical_batch_size=6,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        deterministic_noise_for_testing=True,
        seed=1,
    )
    model = make_model("transformers", tiny_kwargs)
    oracle_model = copy.deepcopy(model)
    batch = first_logical_batch(args, len(dataset))
    assert len(batch) >= 2
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences())
    trainer.add_callback(_InterruptOnce())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.privacy_accountant.steps == 0  # nothing was released
    capture = _CaptureGrads(model)
    trainer.add_callback(capture)
    trainer.train()  # the sampler is re-seeded: its first batch is `batch` again
    assert trainer.privacy_accountant.steps == 1 and len(capture.grads) == 1
    expected = clipped_sum_oracle(oracle_model, dataset, batch, args.per_sample_max_grad_norm)
    for (name, _), p_oracle in zip(model.named_parameters(), oracle_model.parameters()):
        torch.testing.assert_close(
            capture.grads[0][name], expected[id(p_oracle)] / args.logical_batch_size, rtol=1e-4, atol=2e-6
        )


# ------------------------------------------------------ a second train() with other privacy parameters
@pytest.mark.parametrize(
    "change",
    ["logical_batch_size", "dataset", "noise_multiplier", "per_sample_max_grad_norm", "sampling"],
)
def test_second_train_with_other_privacy_parameters_is_refused(tmp_path, tiny_kwargs, change):
    """The running accountant keeps composing its own (σ, q, scheme, N); before the fix a second train() after e.g.
    raising logical_batch_size from 2 to 20 drew batches at q = 20/N but accounted them at q = 2/N (ε reported 0.57
    instead of the dp_accounting value of the mixed composition, > 2)."""
    dataset = make_dataset(num_docs=40)
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2, max_steps=1, learning_rate=0.0)
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    trainer.train()
    q = 2 / len(dataset)
    assert trainer.get_epsilon() == pytest.approx(poisson_pld_epsilon(1.0, q, 1), rel=1e-12)
    if change == "logical_batch_size":
        trainer.args.logical_batch_size = 20
    elif change == "dataset":
        trainer.train_dataset = make_dataset(num_docs=80, seed=1)
    elif change == "noise_multiplier":
        trainer.args.noise_multiplier = 0.5
    elif change == "per_sample_max_grad_norm":
        trainer.args.per_sample_max_grad_norm = 10.0
    else:
        trainer.args.sampling, trainer.args.max_physical_batch = "truncated_poisson", 2
    match = "clipping norm" if change == "per_sample_max_grad_norm" else "Cannot continue training with different"
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.privacy_accountant.steps == 1 and trainer.sampling_rate == q  # the running state is untouched


def test_second_train_with_the_same_parameters_continues_the_accountant(tmp_path, tiny_kwargs):
    dataset = make_dataset(num_docs=40)
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2, max_steps=1, learning_rate=0.0)
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    trainer.train()
    trainer.train()
    assert trainer.privacy_accountant.steps == 2
    assert trainer.get_epsilon() == pytest.approx(poisson_pld_epsilon(1.0, 2 / len(dataset), 2), rel=1e-12)


def test_clipping_norm_changed_after_construction_is_refused_before_training(tmp_path, tiny_kwargs):
    """The engine clips with the C it was built with; before the fix a C changed in the arguments afterwards was
    silently ignored by the engine but written to the model card and dp_state.json."""
    dataset = make_dataset(num_docs=24)
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2, max_steps=1, per_sample_max_grad_norm=1.0)
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    trainer.args.per_sample_max_grad_norm = 0.1
    with pytest.raises(ValueError, match="clipping norm C=1.0"):
        trainer.train()
    assert trainer.privacy_accountant is None


# ------------------------------------------------------------------------------------- the model card
def _summary(**overrides) -> DPTrainingSummary:
    values = dict(
        base_model="tiny",
        model_name="out",
        privacy_unit="sequence",
        epsilon=1.0,
        delta=1e-5,
        target_epsilon=None,
        accountant="pld",
        dp_accounting_version="0.6.0",
        sampling="poisson",
        sampling_rate=0.01,
        noise_multiplier=1.0,
        clip_norm=1.0,
        logical_batch_size=2,
        max_physical_batch=None,
        steps=10,
        dataset_size=200,
        dataset_sha256="0" * 64,
        trainable_parameters=10,
        frozen_parameters=0,
    )
    values.update(overrides)
    return DPTrainingSummary(**values)


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(1.2344172, 1 / 30), (0.5000000001, 1.04e-6), (7.99951, 1e-5), (2.0, 1e-3)]
)
def test_model_card_never_prints_a_smaller_epsilon_or_delta(epsilon, delta):
    """Nearest rounding printed ε = 1.2344172 as 1.234 and δ = 1/30 as 0.0333: a stronger guarantee than the run's."""
    card = " ".join(render_model_card(_summary(epsilon=epsilon, delta=delta)).split())
    sentence = re.search(r"\(ε = ([0-9.e+-]+), δ = ([0-9.e+-]+)\)-differential", card)
    assert sentence, card[:500]
    assert float(sentence.group(1)) >= epsilon and float(sentence.group(2)) >= delta
    assert float(sentence.group(1)) <= epsilon * (1 + 1e-3) and float(sentence.group(2)) <= delta * (1 + 1e-2)
    row = re.search(r"\| ε \(epsilon\) spent \| ([^|]+) \|", card)
    assert row and float(row.group(1).split()[0]) >= epsilon
    if float(row.group(1).split()[0]) != epsilon:  # the exact value is shown next to the rounded-up one
        assert f"(exact: {epsilon!r})" in row.group(1)
    non_private = render_model_card(_summary(epsilon=math.inf, noise_multiplier=0.0, non_private=True))
    assert "| ε (epsilon) spent | ∞ (NOT PRIVATE) |" in non_private


# ------------------------------------------------------------- a seeded (testing) run stays flagged
def test_resuming_a_seeded_testing_run_keeps_the_testing_flag(tmp_path, tiny_kwargs):
    """A checkpoint trained with deterministic_noise_for_testing resumed without it: the released card said "fresh OS
    entropy" although the first steps' noise is reproducible from the seed."""
    dataset = make_dataset(num_docs=24)
    common = dict(noise_multiplier=1.0, logical_batch_size=2, learning_rate=0.0)
    args = args_for(
        tmp_path, max_steps=1, save_strategy="steps", save_steps=1, deterministic_noise_for_testing=True, **common
    )
    first = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    first.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-1")
    assert json.load(open(os.path.join(checkpoint, DP_STATE_NAME)))["deterministic_noise_for_testing"] is True

    resumed_args = args_for(tmp_path, max_steps=2, **common)
    resumed = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=resumed_args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=checkpoint)
    resumed.save_model()
    assert resumed.privacy_accountant.steps == 2
    state = json.load(open(os.path.join(resumed_args.output_dir, DP_STATE_NAME)))
    assert state["deterministic_noise_for_testing"] is True
    card = open(os.path.join(resumed_args.output_dir, "README.md"), encoding="utf-8").read()
    assert "TESTING RUN" in card


# ------------------------------------------------- training a DPTrainer output again on the same data
def test_retraining_a_dp_trained_model_on_the_same_data_warns(tmp_path, tiny_kwargs, caplog):
    """A model saved by DPTrainer, reloaded with from_pretrained and trained by a NEW DPTrainer on the same data:
    the new accountant starts from 0, so the second card's ε omits the first run's privacy loss on that data."""
    import transformers

    dataset = make_dataset(num_docs=24)
    common = dict(noise_multiplier=1.0, logical_batch_size=2, max_steps=1, learning_rate=0.0)
    first_args = args_for(tmp_path / "first", **common)
    first = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=first_args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    first.train()
    first.save_model()
    state = json.load(open(os.path.join(first_args.output_dir, DP_STATE_NAME)))
    assert state["dataset_sha256"] == dataset.sha256()

    messages = {}
    for name, data in (("same", dataset), ("other", make_dataset(num_docs=24, seed=5))):
        reloaded = transformers.VaultGemmaForCausalLM.from_pretrained(first_args.output_dir)
        trainer = DPTrainer(
            model=reloaded, args=args_for(tmp_path / name, **common), train_dataset=data,
            data_collator=DataCollatorForPackedSequences(),
        )  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="vaultgemma_hf.trainer.dp_trainer"):
            trainer.train()
        messages[name] = caplog.text
    assert "already trained on this same training data" in messages["same"]
    assert "already trained on this same training data" not in messages["other"]

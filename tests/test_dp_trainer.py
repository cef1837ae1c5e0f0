"""End-to-end tests of DPTrainer on tiny models, against independent oracles.

Oracles: `dp_accounting` events built by hand in the tests (ε), a slow per-example loop with one backward per
sequence and the model's own HF loss (the clipped gradient sum), and the closed-form SGD update.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import warnings
from importlib.metadata import version

import dp_accounting
import pytest
import torch
import transformers
from transformers import TrainerCallback

from vaultgemma_hf.data.packing import DataCollatorForPackedSequences, PackedDataset, pack_documents
from vaultgemma_hf.dp.engine import DPGradientEngine
from vaultgemma_hf.dp.sampling import PAD_INDEX, DPBatchSampler, fresh_generator
from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.planning import default_delta as planning_default_delta
from vaultgemma_hf.trainer import DP_STATE_NAME, DPTrainer, DPTrainingArguments
from vaultgemma_hf.trainer.dp_trainer import deterministic_seeds

DELTA = 1e-3
COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, save_strategy="no")


def make_model(kind: str, tiny_kwargs, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "transformers":
        return transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**tiny_kwargs()))
    import vaultgemma_hf

    return vaultgemma_hf.VaultGemmaForCausalLM(vaultgemma_hf.VaultGemmaConfig(**tiny_kwargs()))


def make_dataset(num_docs: int = 24, seq_len: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [
        torch.randint(3, 97, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g).tolist()
        for _ in range(num_docs)
    ]
    return pack_documents(docs, seq_len=seq_len, eos_token_id=1, pad_token_id=0)


def args_for(tmp_path, **kwargs) -> DPTrainingArguments:
    values = dict(COMMON)
    values.update(output_dir=str(tmp_path / "out"), target_delta=DELTA, per_device_train_batch_size=2)
    values.update(kwargs)
    return DPTrainingArguments(**values)


def poisson_pld_epsilon(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """Independent oracle: the dp_accounting event built by hand."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def clipped_sum_oracle(model, dataset, indices, clip):
    """Slow loop: one backward per sequence with the model's own HF loss, clip jointly, sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in indices:
        example = dataset[i]
        model.zero_grad(set_to_none=True)
        out = model(
            input_ids=example["input_ids"][None],
            attention_mask=example["attention_mask"][None],
            labels=example["labels"][None],
        )
        out.loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        factor = min(1.0, clip / (norm + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return dict(zip([id(p) for p in params], total))


def first_logical_batch(args, num_units: int) -> list[int]:
    sampler = DPBatchSampler(
        num_units,
        args.logical_batch_size,
        sampling=args.sampling,
        micro_batches_per_step=args.gradient_accumulation_steps,
        micro_batch_size=args.per_device_train_batch_size,
        generator=fresh_generator(deterministic_seeds(args.seed, 0)[0]),
        max_batch_size=args.max_physical_batch,
    )
    it = iter(sampler)
    micro = [next(it) for _ in range(args.gradient_accumulation_steps)]
    return [i for m in micro for i in m if i != PAD_INDEX]


# --------------------------------------------------------------------------------------------------- arguments
def test_arguments_refuse_unsafe_or_confusing_settings(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, logical_batch_size=4)
    args = DPTrainingArguments(**base, noise_multiplier=1.0)
    assert args.max_grad_norm == 0.0 and args.sampling == "poisson" and args.accountant == "pld"
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        DPTrainingArguments(**base, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="allow_shuffled_batches_without_amplification"):
        DPTrainingArguments(**base, noise_multiplier=1.0, sampling="shuffle")
    assert (
        DPTrainingArguments(
            **base, noise_multiplier=1.0, sampling="shuffle", allow_shuffled_batches_without_amplification=True
        ).sampling
        == "shuffle"
    )
    with pytest.raises(ValueError, match="not both"):
        DPTrainingArguments(**base, noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValueError, match="target_epsilon .* or noise_multiplier"):
        DPTrainingArguments(**base)
    with pytest.raises(ValueError, match="per_device_train_batch_size is only the physical"):
        DPTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="fp16"):
        DPTrainingArguments(**base, noise_multiplier=1.0, fp16=True)
    with pytest.raises(ValueError, match="rdp"):
        DPTrainingArguments(**base, noise_multiplier=1.0, sampling="truncated_poisson", accountant="rdp")
    with pytest.raises(ValueError, match="max_physical_batch only applies"):
        DPTrainingArguments(**base, noise_multiplier=1.0, max_physical_batch=8)
    # transformers >= 5.23 names it activation_checkpointing (the old name still works, with a FutureWarning).
    fields = {f.name for f in dataclasses.fields(DPTrainingArguments)}
    for name in {"activation_checkpointing", "gradient_checkpointing"} & fields:
        with pytest.raises(ValueError, match="checkpointing is not supported"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            DPTrainingArguments(**base, noise_multiplier=1.0, **{name: True})
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        DPTrainingArguments(**base, noise_multiplier=-1.0)


def test_every_dp_argument_has_help_text():
    # HfArgumentParser turns `help` into the `vaultgemma-hf train --help` text: every field the DP subclass declares
    # (new ones and the overridden max_grad_norm) must explain itself.
    declared = set(vars(DPTrainingArguments).get("__annotations__", {}))
    fields = {f.name: f for f in dataclasses.fields(DPTrainingArguments)}
    inherited = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    assert set(fields) - inherited <= declared and "max_grad_norm" in declared and "target_epsilon" in declared
    missing = [name for name in sorted(declared) if not str(fields[name].metadata.get("help", "")).strip()]
    assert not missing, f"DPTrainingArguments fields without help: {missing}"


def test_default_target_delta_and_large_delta_warning(tmp_path, tiny_kwargs, caplog):
    dataset = make_dataset()
    n = len(dataset)
    default = min(1e-5, 1 / (10 * n))  # the planner's default too (one definition, checked below)
    for delta, expected, warned in ((None, default, False), (1.0 / n, 1.0 / n, True), (0.5, 0.5, True)):
        args = args_for(tmp_path, noise_multiplier=2.0, target_delta=delta, logical_batch_size=2, max_steps=3)
        assert args.target_delta == delta
        trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset)
        caplog.clear()
        with caplog.at_level("WARNING", logger="vaultgemma_hf.trainer.dp_trainer"):
            trainer.setup_privacy()
        assert trainer.target_delta == pytest.approx(expected, rel=1e-12)
        if delta is None:
            assert trainer.target_delta < 1.0 / n
            assert trainer.target_delta == planning_default_delta(n)  # a plan made without --delta uses the same δ
        assert (f"is >= 1/N = {1.0 / n:g}" in caplog.text) is warned, caplog.text
        trainer.privacy_accountant.step(3)
        assert trainer.get_epsilon() == pytest.approx(poisson_pld_epsilon(2.0, 2 / n, 3, expected), rel=1e-9)


# --------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pld_run(tmp_path_factory):
    """One target-epsilon PLD run of 4 steps with a checkpoint at step 2 (shared by several tests)."""
    from conftest import tiny_config_kwargs

    tmp_path = tmp_path_factory.mktemp("pld")
    dataset = make_dataset()
    args = args_for(
        tmp_path,
        target_epsilon=0.5,
        logical_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-3,
    )
    model = make_model("transformers", lambda: tiny_config_kwargs())
    model.model.embed_tokens.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)  # one frozen tensor for the model card
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences())
    trainer.train()
    trainer.save_model()
    return trainer, dataset, args


def test_logged_epsilon_equals_dp_accounting_and_calibration_meets_target(pld_run):
    trainer, dataset, args = pld_run
    q = args.logical_batch_size / len(dataset)
    assert trainer.sampling_rate == q
    sigma = trainer.noise_multiplier
    logged = {h["step"]: h["epsilon"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == [2, 4]
    for step, epsilon in logged.items():
        assert epsilon == pytest.approx(poisson_pld_epsilon(sigma, q, step), rel=1e-9)
    final = poisson_pld_epsilon(sigma, q, 4)
    assert trainer.get_epsilon() == pytest.approx(final, rel=1e-9)
    # calibration: the planned 4 steps spend the target (within the 1% tolerance), never more
    assert 0.5 * 0.98 <= final <= 0.5
    assert poisson_pld_epsilon(sigma * 0.97, q, 4) > 0.5  # a noticeably smaller sigma would overspend
    assert trainer.privacy_accountant.steps == trainer.state.global_step == 4
    for h in trainer.state.log_history:
        if "loss" in h:  # clipping statistics exist only when the window sampled something (Poisson: may be empty)
            assert "dp_batch_size" in h and ("dp_clipped_fraction" in h) == (h["dp_batch_size"] > 0)


def test_model_card_and_dp_state_disclose_the_guarantee(pld_run):
    trainer, dataset, args = pld_run
    out = args.output_dir
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    state = json.load(open(os.path.join(out, DP_STATE_NAME)))
    assert state["accountant"]["steps"] == 4 and state["accountant_steps"] == 4
    assert state["noise_multiplier"] == trainer.noise_multiplier
    assert state["dataset_sha256"] == dataset.sha256()
    assert f"{trainer.get_epsilon():.4g}" in card
    flat = " ".join(card.split())  # the template wraps its prose
    for needle in (
        "one training sequence of 16 tokens",
        f"{DELTA:.3g}",
        "PLD",
        f"dp_accounting {version('dp-accounting')})",
        "Poisson sampling",
        f"{trainer.noise_multiplier:.6g}",
        f"| Per-sequence clipping norm C | {args.per_sample_max_grad_norm:.6g} |",
        "| Logical batch (expected sequences per step) | 2 |",
        "| Steps (logical, noisy) | 4 |",
        f"| Training set size N (privacy units) | {len(dataset)} |",
        dataset.sha256(),
        "`model.norm.weight`",
        "ε ≤ 2.0, δ ≤ 1.1e-10",
        "1024-token sequence",
        "do not compose into one number",
        "TESTING RUN" if args.deterministic_noise_for_testing else "fresh OS entropy",
        "(add/remove adjacency)",
        # what the guarantee covers, and what it does not
        "the model weights: the final and every checkpointed set of parameters",
        "optimizer state",
        "## What the guarantee does not cover",
        "`trainer_state.json`",
        "`dp_batch_size`",
        "`dp_mean_grad_norm`",
        "`dp_clipped_fraction`",
        "training data SHA-256",
        "do not release these records with the model",
    ):
        assert needle in flat, needle
    assert "NOT PRIVATE" not in card
    assert "every intermediate checkpoint" not in flat  # the old over-claim (logs are in every checkpoint)
    assert os.path.isfile(os.path.join(out, "checkpoint-2", DP_STATE_NAME))
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "README.md"))


def test_resume_restores_accountant_exactly_and_continues(pld_run, tiny_kwargs):
    trainer, dataset, args = pld_run
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    saved = json.load(open(os.path.join(checkpoint, DP_STATE_NAME)))
    resume_args = copy.deepcopy(args)
    resume_args.output_dir = args.output_dir + "-resumed"
    model = make_model("transformers", tiny_kwargs)
    model.model.norm.weight.requires_grad_(False)
    resumed = DPTrainer(
        model=model, args=resume_args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences()
    )
    resumed.setup_privacy(checkpoint)
    assert resumed.privacy_accountant.state_dict() == saved["accountant"]
    assert resumed.noise_multiplier == trainer.noise_multiplier
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 4
    assert resumed.privacy_accountant.state_dict() == trainer.privacy_accountant.state_dict()
    assert resumed.get_epsilon() == pytest.approx(trainer.get_epsilon(), rel=1e-12)
    # noise and sampling are fresh after resume, so the weights differ from the original run's
    assert not torch.equal(resumed.model.lm_head.weight, trainer.model.lm_head.weight)


def test_resume_true_restores_the_last_checkpoint_exactly(pld_run, tiny_kwargs, tmp_path, caplog):
    # train(resume_from_checkpoint=True) resumes from the last checkpoint in output_dir (here the only one)
    trainer, dataset, args = pld_run
    resume_args = copy.deepcopy(args)
    resume_args.output_dir = str(tmp_path / "auto")
    shutil.copytree(
        os.path.join(args.output_dir, "checkpoint-2"), os.path.join(resume_args.output_dir, "checkpoint-2")
    )
    saved = json.load(open(os.path.join(resume_args.output_dir, "checkpoint-2", DP_STATE_NAME)))
    assert saved["accountant_steps"] == 2
    model = make_model("transformers", tiny_kwargs)
    model.model.norm.weight.requires_grad_(False)
    resumed = DPTrainer(
        model=model, args=resume_args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences()
    )
    restored = []
    resumed.add_callback(RecordAccountantAtTrainBegin(resumed, restored))
    with caplog.at_level("INFO", logger="vaultgemma_hf.trainer.dp_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert restored == [(saved["accountant"], 2)]  # restored before the first resumed step
    assert "Restored the privacy accountant from" in caplog.text and "checkpoint-2: 2 steps done" in caplog.text
    assert "later checkpoint" not in caplog.text  # the last checkpoint is not a branch
    assert resumed.state.global_step == 4 == resumed.privacy_accountant.steps
    assert resumed.privacy_accountant.state_dict() == trainer.privacy_accountant.state_dict()
    assert resumed.get_epsilon() == pytest.approx(trainer.get_epsilon(), rel=1e-12)
    assert resumed.get_epsilon() == pytest.approx(
        poisson_pld_epsilon(trainer.noise_multiplier, trainer.sampling_rate, 4), rel=1e-9
    )


class RecordAccountantAtTrainBegin(TrainerCallback):
    """Records (accountant state, steps) when the HF loop begins, i.e. what the resumed run starts from."""

    def __init__(self, trainer: DPTrainer, out: list) -> None:
        self.trainer, self.out = trainer, out

    def on_train_begin(self, args, state, control, **kwargs):
        accountant = self.trainer.privacy_accountant
        self.out.append((accountant.state_dict(), accountant.steps))


def test_resuming_an_older_checkpoint_warns_about_the_later_ones(pld_run, tiny_kwargs, caplog):
    # out/ holds checkpoint-2, checkpoint-4 and the final model (4 steps): continuing from checkpoint-2 starts a
    # second branch of training on the same data; each branch's accountant covers only that branch.
    trainer, dataset, args = pld_run
    resumed = DPTrainer(
        model=make_model("transformers", tiny_kwargs),
        args=copy.deepcopy(args),
        train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="vaultgemma_hf.trainer.dp_trainer"):
        resumed.setup_privacy(os.path.join(args.output_dir, "checkpoint-2"))
    warnings = [r.getMessage() for r in caplog.records if "later checkpoint" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    flat = " ".join(warnings[0].split())
    assert "checkpoint-4" in flat and "checkpoint-2" in flat.split("later")[0]
    assert "the model saved in" in flat and "(step 4)" in flat
    assert "each released branch is accounted separately" in flat.lower()
    assert "does not cover releasing both" in flat
    assert resumed.privacy_accountant.steps == 2  # a warning only: the resume itself is unchanged
    caplog.clear()
    with caplog.at_level("WARNING", logger="vaultgemma_hf.trainer.dp_trainer"):
        resumed.setup_privacy(os.path.join(args.output_dir, "checkpoint-4"))  # the latest: no second branch
    assert "later checkpoint" not in caplog.text


def test_progress_bar_shows_the_current_epsilon(tmp_path, tiny_kwargs, capsys):
    from transformers.trainer_callback import ProgressCallback

    class RecordPostfix(TrainerCallback):  # added after DPCallback, so it sees the bar as DPCallback left it
        def __init__(self, trainer: DPTrainer) -> None:
            self.trainer, self.seen = trainer, []

        def on_log(self, args, state, control, logs=None, **kwargs):
            bars = [c.training_bar for c in self.trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
            assert len(bars) == 1 and bars[0] is not None
            self.seen.append((state.global_step, bars[0].postfix, self.trainer.get_epsilon()))

    args = args_for(
        tmp_path, noise_multiplier=2.0, logical_batch_size=2, max_steps=3, logging_steps=1, disable_tqdm=False
    )
    dataset = make_dataset()
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset)
    recorder = RecordPostfix(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    q = 2 / len(dataset)
    steps = [step for step, _, _ in recorder.seen]
    assert steps[:3] == [1, 2, 3] and set(steps) == {1, 2, 3}  # each step's log (+ the final train_loss one)
    for step, postfix, epsilon in recorder.seen:
        assert epsilon == pytest.approx(poisson_pld_epsilon(2.0, q, step), rel=1e-9)
        assert postfix == f"epsilon={round_up(epsilon)}", (step, postfix)  # rounded up, as the card
    # and what was written to the terminal: the bar's last frame carries the final epsilon as its postfix
    final = f"epsilon={trainer.get_epsilon():.4g}"
    frames = capsys.readouterr().err.replace("\r", "\n").splitlines()
    bar_frames = [f for f in frames if "3/3" in f]
    assert bar_frames and final in bar_frames[-1], frames[-5:]


def test_refuses_to_start_beyond_the_budget(pld_run):
    trainer, _, _ = pld_run
    with pytest.raises(ValueError, match=r"Refusing to start: the plan of 8 steps .* At most 4 steps fit"):
        trainer.train()  # a second call would spend 4 more steps on the same model


def test_stops_when_the_budget_is_reached(tmp_path, tiny_kwargs):
    class Extend(TrainerCallback):  # something else tries to run past the planned steps
        def on_train_begin(self, args, state, control, **kwargs):
            state.max_steps = 10

    args = args_for(tmp_path, target_epsilon=1.0, accountant="rdp", logical_batch_size=2, max_steps=2, logging_steps=1)
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs),
        args=args,
        train_dataset=make_dataset(),
        data_collator=DataCollatorForPackedSequences(),
        callbacks=[Extend()],
    )
    trainer.train()
    assert trainer.state.global_step == 2 == trainer.privacy_accountant.steps
    assert trainer.get_epsilon() <= 1.0


def test_unreachable_target_is_a_clear_error(tmp_path, tiny_kwargs):
    dataset = make_dataset(num_docs=6)
    args = args_for(
        tmp_path,
        target_epsilon=1e-9,
        target_delta=1e-12,
        accountant="rdp",
        logical_batch_size=len(dataset),
        max_steps=1000,
    )
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match=r"cannot be reached with 1000 steps .* even noise_multiplier=1e\+06 gives"):
        trainer.setup_privacy()  # what train() does first; nothing is trained


# --------------------------------------------------------------------------------------------------- the update
@pytest.mark.parametrize(
    ("kind", "sampling", "seed"),
    [("transformers", "poisson", 0), ("vaultgemma_hf", "poisson", 1), ("transformers", "truncated_poisson", 2)],
)
def test_update_equals_clipped_sum_plus_engine_noise(tmp_path, tiny_kwargs, kind, sampling, seed):
    """One logical step (2 accumulation micro-steps) with seeded noise: θ' = θ - lr (Σ clip(g_i) + noise) / L."""
    dataset = make_dataset(num_docs=12)
    extra = {"max_physical_batch": 4} if sampling == "truncated_poisson" else {}
    args = args_for(
        tmp_path,
        noise_multiplier=3.0,
        per_sample_max_grad_norm=0.5,
        logical_batch_size=4,
        gradient_accumulation_steps=2,
        sampling=sampling,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        deterministic_noise_for_testing=True,
        seed=seed,
        **extra,
    )
    model = make_model(kind, tiny_kwargs)
    if kind == "vaultgemma_hf":  # also a partially frozen model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.requires_grad_(False)
    before = copy.deepcopy(model)
    oracle_model = copy.deepcopy(model)
    batch = first_logical_batch(args, len(dataset))
    assert batch, "pick a seed whose first batch is not empty"
    expected_sum = clipped_sum_oracle(oracle_model, dataset, batch, args.per_sample_max_grad_norm)

    noise_model = copy.deepcopy(model)
    DPGradientEngine(noise_model, args.per_sample_max_grad_norm).finalize_step(
        args.noise_multiplier, args.logical_batch_size, generator=fresh_generator(deterministic_seeds(args.seed, 0)[1])
    )
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences())
    trainer.train()
    assert trainer.state.global_step == 1 == trainer.privacy_accountant.steps  # 2 micro-steps = 1 logical step
    logged = [h for h in trainer.state.log_history if "loss" in h][0]
    assert logged["dp_batch_size"] == len(batch)

    trainable = {
        name: (p_before, p_oracle, p_noise)
        for (name, p_before), p_oracle, p_noise in zip(
            before.named_parameters(), oracle_model.parameters(), noise_model.parameters()
        )
        if p_before.requires_grad
    }
    after = dict(model.named_parameters())
    for name, (p_before, p_oracle, p_noise) in trainable.items():
        expected_grad = expected_sum[id(p_oracle)] / args.logical_batch_size + p_noise.grad
        torch.testing.assert_close(p_before.detach() - after[name].detach(), expected_grad, rtol=1e-4, atol=2e-6)
    for name, p in before.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, after[name]), name


def test_empty_poisson_batch_still_steps_with_noise(tmp_path, tiny_kwargs):
    dataset = make_dataset(num_docs=12)
    base = dict(
        noise_multiplier=1.0,
        logical_batch_size=1,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        deterministic_noise_for_testing=True,
    )
    seed = next(s for s in range(100) if not first_logical_batch(args_for(tmp_path, **base, seed=s), len(dataset)))
    args = args_for(tmp_path, **base, seed=seed)
    model = make_model("transformers", tiny_kwargs)
    before = copy.deepcopy(model)
    noise_model = copy.deepcopy(model)
    DPGradientEngine(noise_model, args.per_sample_max_grad_norm).finalize_step(
        1.0, 1, generator=fresh_generator(deterministic_seeds(seed, 0)[1])
    )
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForPackedSequences())
    trainer.train()
    assert trainer.privacy_accountant.steps == 1
    assert [h for h in trainer.state.log_history if "loss" in h][0]["dp_batch_size"] == 0
    for p0, p1, pn in zip(before.parameters(), model.parameters(), noise_model.parameters()):
        torch.testing.assert_close(p0 - p1, pn.grad, rtol=1e-5, atol=1e-6)
        assert pn.grad.abs().max() > 0


def test_extended_precision_epsilon_is_disclosed_in_the_card(tmp_path, tiny_kwargs):
    # δ = 1e-13 over 10 steps is at the float64 floor (T x 1e-14): ε comes from the 80-bit composition; dp_accounting's
    # float64 value is itself off by ~1e-4 relative there, hence the tolerance. The card says how ε was computed.
    args = args_for(tmp_path, noise_multiplier=2.0, target_delta=1e-13, logical_batch_size=2, max_steps=10)
    dataset = make_dataset()
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model()
    q = args.logical_batch_size / len(dataset)
    assert trainer.get_epsilon() == pytest.approx(poisson_pld_epsilon(2.0, q, 10, delta=1e-13), rel=1e-3)
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "computed in 80-bit extended precision" in " ".join(card.split())


def test_delta_below_the_pld_precision_is_warned(tmp_path, tiny_kwargs, caplog):
    # δ <= T x 1e-14: dp_accounting's float64 PLD ε is unreliable there (test_accounting shows it): the trainer says
    # so, and its ε comes from the 80-bit composition (equal to the ε dp_accounting would give with exact arithmetic).
    for delta, warned in ((1e-12, True), (1e-9, False)):
        args = args_for(tmp_path, noise_multiplier=2.0, target_delta=delta, logical_batch_size=2, max_steps=200)
        trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=make_dataset())
        caplog.clear()
        with caplog.at_level("WARNING"):
            trainer.setup_privacy()
        assert ("precision of dp_accounting's float64 PLD" in caplog.text) is warned, caplog.text
        assert ("80-bit extended precision" in caplog.text) is warned


def test_non_private_control_is_labelled(tmp_path, tiny_kwargs):
    args = args_for(tmp_path, noise_multiplier=0.0, logical_batch_size=2, max_steps=1, logging_steps=1)
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=make_dataset())
    trainer.train()
    assert math.isinf(trainer.get_epsilon())
    assert math.isinf([h for h in trainer.state.log_history if "loss" in h][0]["epsilon"])
    trainer.save_model()
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "**NOT PRIVATE.**" in card and "not** differentially private" in card


def test_shuffle_opt_in_is_accounted_without_amplification_and_flagged(tmp_path, tiny_kwargs):
    dataset = make_dataset(num_docs=12)
    args = args_for(
        tmp_path,
        noise_multiplier=2.0,
        logical_batch_size=4,
        sampling="shuffle",
        allow_shuffled_batches_without_amplification=True,
        max_steps=2,
        logging_steps=2,
    )
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset)
    trainer.train()
    epochs = math.ceil(2 / (len(dataset) // 4))  # epochs of floor(N / L) steps (the remainder sits each one out)
    assert trainer.get_epsilon() == pytest.approx(gaussian_composition_epsilon(2.0, epochs), rel=1e-9)
    assert all(h["dp_batch_size"] == 4 for h in trainer.state.log_history if "loss" in h)
    trainer.save_model()
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "SHUFFLED fixed-size batches" in card and "no Poisson amplification" in card
    # the shuffle bound (sensitivity C, one Gaussian per epoch) is a zero-out bound, not an add/remove one
    assert "(zero-out adjacency)" in card and "add/remove adjacency)" not in card
    assert "not** hold for add/remove adjacency" in card and "2ε" in card


def gaussian_composition_epsilon(sigma: float, count: int, delta: float = DELTA) -> float:
    """Independent oracle: `count` Gaussian mechanisms of noise multiplier `sigma`, composed by dp_accounting."""
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), count))
    return accountant.get_epsilon(delta)


class RecordingDataset(PackedDataset):
    """Records every index fetched while `recording` is on (a superset of the sequences actually trained on)."""

    recording = False

    def __init__(self, packed: PackedDataset) -> None:
        super().__init__(packed.input_ids, packed.lengths)
        self.fetched: list[int] = []

    def __getitem__(self, index: int):
        if self.recording:
            self.fetched.append(int(index))
        return super().__getitem__(index)


class RecordTraining(TrainerCallback):
    """Turns recording on for the training loop only, and counts the epochs it starts."""

    def __init__(self, dataset: RecordingDataset) -> None:
        self.dataset = dataset
        self.epochs_begun = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.dataset.recording = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epochs_begun += 1

    def on_train_end(self, args, state, control, **kwargs):
        self.dataset.recording = False


def test_shuffle_participations_never_exceed_the_composed_gaussians(tmp_path, tiny_kwargs):
    # N = 10, L = 9: every epoch is ONE batch of 9 (one sequence sits it out), so 10 steps start 10 epochs and
    # some sequence is (almost surely) used 10 times. Counting ceil(10 * 9 / 10) = 9 epochs would under-report ε.
    from vaultgemma_hf.dp.accounting import make_dp_event

    dataset = RecordingDataset(
        pack_documents([[5 + i] * 15 for i in range(10)], seq_len=16, eos_token_id=1, cross_document_boundaries=False)
    )
    assert len(dataset) == 10
    recorder = RecordTraining(dataset)
    args = args_for(
        tmp_path,
        noise_multiplier=2.0,
        logical_batch_size=9,
        per_device_train_batch_size=9,
        sampling="shuffle",
        allow_shuffled_batches_without_amplification=True,
        max_steps=10,
        logging_steps=10,
        deterministic_noise_for_testing=True,
        seed=0,
    )
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs),
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
        callbacks=[recorder],
    )
    trainer.train()
    assert trainer.privacy_accountant.steps == 10 and len(dataset.fetched) >= 10 * 9
    participations = max(dataset.fetched.count(i) for i in set(dataset.fetched))
    composed = make_dp_event(2.0, 0.9, 10, sampling="shuffle", dataset_size=10, logical_batch_size=9).count
    assert participations <= composed
    assert recorder.epochs_begun == 10 == composed
    assert trainer.get_epsilon() == pytest.approx(gaussian_composition_epsilon(2.0, composed), rel=1e-9)


def test_shuffle_resume_only_at_an_epoch_boundary(tmp_path, tiny_kwargs):
    # N = 12, L = 6: two steps per shuffled epoch. The permutation of an interrupted epoch is not saved, so a
    # resumed run would reshuffle and could reuse that epoch's sequences within one accounted epoch: refused.
    dataset = pack_documents(
        [[5 + i] * 15 for i in range(12)], seq_len=16, eos_token_id=1, cross_document_boundaries=False
    )
    assert len(dataset) == 12
    shuffle = dict(
        noise_multiplier=2.0,
        logical_batch_size=6,
        per_device_train_batch_size=6,
        sampling="shuffle",
        allow_shuffled_batches_without_amplification=True,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
    )
    args = args_for(tmp_path, max_steps=3, **shuffle)
    collator = DataCollatorForPackedSequences()
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset, data_collator=collator
    )
    trainer.train()
    assert trainer.privacy_accountant.steps == 3
    with pytest.raises(ValueError, match=r"after 3 steps, in the middle of a shuffled epoch \(2 steps"):
        trainer.train()  # a second train() reshuffles too
    for step in (1, 3):
        resumed = DPTrainer(
            model=make_model("transformers", tiny_kwargs),
            args=args_for(tmp_path / f"r{step}", max_steps=4, **shuffle),
            train_dataset=dataset,
            data_collator=collator,
        )
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}")
        with pytest.raises(ValueError, match=r"epoch boundary .*Poisson sampling \(sampling='poisson'\)"):
            resumed.train(resume_from_checkpoint=checkpoint)
        assert resumed.state.global_step == 0  # refused before training
    resumed = DPTrainer(
        model=make_model("transformers", tiny_kwargs),
        args=args_for(tmp_path / "r2", max_steps=4, **shuffle),
        train_dataset=dataset,
        data_collator=collator,
    )
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    assert resumed.state.global_step == 4 == resumed.privacy_accountant.steps
    assert resumed.get_epsilon() == pytest.approx(gaussian_composition_epsilon(2.0, 2), rel=1e-9)


def test_evaluation_loss_is_mean_per_sequence_loss(tmp_path, tiny_kwargs):
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 97, (20,), generator=g).tolist() for _ in range(7)]
    dataset = pack_documents(docs, seq_len=16, eos_token_id=1, drop_remainder=True)  # every sequence has targets
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2, per_device_eval_batch_size=3)
    model = make_model("vaultgemma_hf", tiny_kwargs)
    trainer = DPTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    metrics = trainer.evaluate()
    with torch.no_grad():
        losses = [model(**{k: v[None] for k, v in dataset[i].items()}).loss.item() for i in range(len(dataset))]
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_clear_errors_for_bad_data(tmp_path, tiny_kwargs):
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2, max_steps=1)
    long = pack_documents([list(range(3, 90))], seq_len=80, eos_token_id=1)  # model has 64 positions
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=long)
    with pytest.raises(ValueError, match="longer than the model's max_position_embeddings=64"):
        trainer.train()
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=[])
    with pytest.raises(ValueError, match="empty"):
        trainer.train()
    too_big = pack_documents([[5, 6, 7]], seq_len=16, eos_token_id=1)
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=too_big)
    with pytest.raises(ValueError, match="exceeds the number of privacy units"):
        trainer.train()


def test_unsupported_trainable_module_is_named(tmp_path, tiny_kwargs):
    from vaultgemma_hf.dp.engine import UnsupportedModuleError

    model = make_model("transformers", tiny_kwargs)
    model.model.layers[0].extra = torch.nn.Conv1d(2, 2, 1)  # a trainable module without a per-sample rule
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2)
    with pytest.raises(UnsupportedModuleError, match="layers.0.extra"):
        DPTrainer(model=model, args=args, train_dataset=make_dataset())


def test_lora_adapters_only_are_trained_and_saved(tmp_path, tiny_kwargs):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        make_model("transformers", tiny_kwargs), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=4, max_steps=1, logging_steps=1)
    trainer = DPTrainer(model=model, args=args, train_dataset=make_dataset())
    trainer.train()
    trainer.save_model()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and all("lora_" in name for name in trainable)
    assert os.path.isfile(os.path.join(args.output_dir, "adapter_model.safetensors"))
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert f"| Frozen parameters | {frozen:,} " in card


def test_user_level_privacy_unit(tmp_path, tiny_kwargs):
    packed = pack_documents(
        [[10 + i] * 20 for i in range(8)], seq_len=8, eos_token_id=1, user_ids=[0, 0, 1, 1, 1, 2, 3, 3]
    )
    dataset = [packed[i] for i in range(len(packed))]  # a plain list of dicts carrying "user_id"
    args = args_for(
        tmp_path,
        noise_multiplier=2.0,
        privacy_unit="user",
        logical_batch_size=2,
        max_steps=3,
        logging_steps=1,
    )
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.sampling_rate == 2 / 4  # units are the 4 users, not the sequences
    assert trainer.get_epsilon() == pytest.approx(poisson_pld_epsilon(2.0, 0.5, 3), rel=1e-9)
    assert all(h["dp_batch_size"] <= 4 for h in trainer.state.log_history if "loss" in h)  # one sequence per user
    trainer.save_model()
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "one user (each sampled user contributes one sequence of 8 tokens per step)" in card

"""`TrainingArguments` fields and `Trainer` features that DPTrainer must refuse, honour, or say it ignores.

Each test fails without its fix. Oracles: the realised logical batch sizes logged by the run (tokens seen), the
HF Trainer's own rule for `torch_empty_cache_steps` (every micro-step at a global step that is a multiple of it).
"""

from __future__ import annotations

import pytest
from accelerate import ParallelismConfig

from test_dp_trainer import COMMON, args_for, make_dataset, make_model
from vaultgemma_hf.data.packing import DataCollatorForPackedSequences
from vaultgemma_hf.trainer import DPTrainer, DPTrainingArguments
from vaultgemma_hf.trainer import dp_trainer as dp_trainer_module

ARGS_LOGGER = "vaultgemma_hf.trainer.training_args"
TRAINER_LOGGER = "vaultgemma_hf.trainer.dp_trainer"


def _base(tmp_path) -> dict:
    return dict(COMMON, output_dir=str(tmp_path / "out"), logical_batch_size=4, noise_multiplier=1.0)


# ------------------------------------------------------------------------------ refused arguments
@pytest.mark.parametrize("sizes", [dict(cp_size=2), dict(tp_size=2), dict(sp_size=2), dict(dp_shard_size=2)])
def test_parallelism_that_splits_a_sequence_or_the_model_is_refused(tmp_path, sizes):
    """Context/sequence/tensor parallelism give each device a slice of every sequence (or layer): each device would
    clip its partial per-sequence gradient to C, so one sequence could contribute several times C."""
    name = next(iter(sizes))
    with pytest.raises(ValueError, match=rf"parallelism_config with {name}=2 .*clip"):
        DPTrainingArguments(**_base(tmp_path), parallelism_config=ParallelismConfig(**sizes))
    # replicated data parallelism (plain DDP) is what DPTrainer supports
    DPTrainingArguments(**_base(tmp_path), parallelism_config=ParallelismConfig(dp_replicate_size=1))


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise", "apollo_adamw_layerwise"])
def test_optimizers_that_step_during_backward_are_refused(tmp_path, optim):
    """LOMO fuses the update into backward; the layer-wise variants step each parameter from a gradient hook: the
    update would use raw, unclipped, un-noised gradients (or never see the DP gradient)."""
    with pytest.raises(ValueError, match=rf"optim='{optim}' is not supported.*before DPTrainer has\s+clipped"):
        DPTrainingArguments(**_base(tmp_path), optim=optim, optim_target_modules="all-linear")


@pytest.mark.parametrize("optim", ["adafactor", "sgd", "adamw_torch"])
def test_optimizers_that_step_on_the_dp_gradient_are_accepted(tmp_path, optim):
    assert DPTrainingArguments(**_base(tmp_path), optim=optim).optim == optim


def test_refusal_messages_say_why(tmp_path):
    with pytest.raises(ValueError, match="auto_find_batch_size .* restarts the training loop"):
        DPTrainingArguments(**_base(tmp_path), auto_find_batch_size=True)
    with pytest.raises(ValueError, match="torch_compile .* hooks"):
        DPTrainingArguments(**_base(tmp_path), torch_compile=True)


# ------------------------------------------------------------------------------ ignored arguments are said so
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dataloader_drop_last", True, "dataloader_drop_last=True has no effect"),
        ("data_seed", 3, "data_seed=3 is not"),
    ],
)
def test_arguments_ignored_for_training_batches_are_warned(tmp_path, caplog, field, value, message):
    with caplog.at_level("WARNING", logger=ARGS_LOGGER):
        DPTrainingArguments(**_base(tmp_path), **{field: value})
    assert message in caplog.text


# ------------------------------------------------------------------------------ model selection on eval data
@pytest.mark.parametrize(
    "options",
    [
        dict(load_best_model_at_end=True, save_strategy="steps", save_steps=2),
        dict(lr_scheduler_type="reduce_lr_on_plateau"),
    ],
)
def test_eval_driven_choices_on_the_training_data_are_refused(tmp_path, tiny_kwargs, caplog, options):
    """Choosing the released checkpoint (or the learning rate) from noise-free metrics of the training data is a
    non-private function of that data that the accountant does not count."""
    train = make_dataset(num_docs=24)
    args = args_for(
        tmp_path, noise_multiplier=1.0, logical_batch_size=2, max_steps=2, eval_strategy="steps", eval_steps=2,
        **options,
    )  # fmt: skip
    model = make_model("transformers", tiny_kwargs)
    option = next(iter(options))
    with pytest.raises(ValueError, match=rf"{option}.*training dataset as eval_dataset is refused"):
        DPTrainer(model=model, args=args, train_dataset=train, eval_dataset={"train": train})
    with caplog.at_level("WARNING", logger=TRAINER_LOGGER):
        DPTrainer(model=model, args=args, train_dataset=train, eval_dataset=make_dataset(num_docs=8, seed=1))
    assert "covers it only if the evaluation data is public" in caplog.text


def test_hyperparameter_search_is_refused_with_the_reason(tmp_path, tiny_kwargs):
    args = args_for(tmp_path, noise_multiplier=1.0, logical_batch_size=2, max_steps=1)
    trainer = DPTrainer(model=make_model("transformers", tiny_kwargs), args=args, train_dataset=make_dataset())
    with pytest.raises(ValueError, match="hyperparameter_search .* spends privacy budget"):
        trainer.hyperparameter_search(n_trials=2)


# ------------------------------------------------------------------------------ honoured arguments
def test_torch_empty_cache_steps_is_honoured(tmp_path, tiny_kwargs, monkeypatch):
    """The HF training_step empties the device cache on every micro-step at a global step that is a multiple of
    torch_empty_cache_steps; DPTrainer's own training_step skipped it (the option was silently ignored)."""
    calls = []
    monkeypatch.setattr(dp_trainer_module, "clear_device_cache", lambda: calls.append(1), raising=False)
    args = args_for(
        tmp_path, noise_multiplier=1.0, logical_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        torch_empty_cache_steps=2, learning_rate=0.0,
    )  # fmt: skip
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=make_dataset(),
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    trainer.train()
    # global steps 0, 1, 2 with 2 micro-steps each: steps 0 and 2 are multiples of 2
    assert len(calls) == 4


def test_num_input_tokens_seen_counts_sampled_sequences_not_padding(tmp_path, tiny_kwargs):
    """truncated_poisson pads every micro-batch to a fixed shape with masked stand-in rows; they were counted as
    tokens seen. Oracle: the realised batch sizes the run logs (dp_batch_size, one step per log) x seq_len."""
    seq_len = 16
    dataset = make_dataset(num_docs=24, seq_len=seq_len)
    args = args_for(
        tmp_path, noise_multiplier=1.0, logical_batch_size=2, sampling="truncated_poisson",
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, logging_steps=1,
        include_num_input_tokens_seen="all", learning_rate=0.0, deterministic_noise_for_testing=True, seed=0,
    )  # fmt: skip
    trainer = DPTrainer(
        model=make_model("transformers", tiny_kwargs), args=args, train_dataset=dataset,
        data_collator=DataCollatorForPackedSequences(),
    )  # fmt: skip
    trainer.train()
    sizes = [log["dp_batch_size"] for log in trainer.state.log_history if "dp_batch_size" in log]
    assert len(sizes) == 4 and sum(sizes) < 4 * 4, "pick a seed with padding slots"
    assert trainer.state.num_input_tokens_seen == round(sum(sizes)) * seq_len


@pytest.mark.parametrize("strategy, logs", [("every_save", False), ("checkpoint", True)])
def test_push_to_hub_warns_what_the_guarantee_does_not_cover(
    tmp_path, tiny_kwargs, caplog, monkeypatch, strategy, logs
):
    """The upload holds the data SHA-256 (card, dp_state.json) and, for checkpoint strategies, the training logs."""
    import transformers

    monkeypatch.setattr(transformers.Trainer, "push_to_hub", lambda self, *a, **k: "pushed")
    args = DPTrainingArguments(**_base(tmp_path), hub_strategy=strategy)
    trainer = DPTrainer(model=make_model("vaultgemma_hf", tiny_kwargs), args=args, train_dataset=make_dataset())
    with caplog.at_level("WARNING", logger=TRAINER_LOGGER):
        assert trainer.push_to_hub() == "pushed"
    assert "SHA-256 and dp_state.json" in caplog.text
    assert ("trainer_state.json" in caplog.text) == logs

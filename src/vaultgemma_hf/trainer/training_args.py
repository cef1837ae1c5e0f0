"""`DPTrainingArguments`: the `TrainingArguments` of DP-SGD continued pretraining.

Every field carries `help` metadata so that `HfArgumentParser` turns the dataclass into a command line (this is
how `vaultgemma-hf train` is built). Validation that only needs the arguments happens in `__post_init__`;
validation that needs the dataset (its size, the default δ, the sampling rate) happens when `DPTrainer` starts.

Batch semantics (the part people get wrong):

* `logical_batch_size` is the *expected* number of sequences per optimizer step (one DP-SGD step). With Poisson
  sampling every sequence is included independently with probability ``q = logical_batch_size / N``, so the
  realised batch size varies from step to step (and can be 0: the step still happens, with noise only).
* `per_device_train_batch_size` is only the physical micro-batch: the largest number of sequences one
  forward/backward processes on one device. It bounds memory; it does not change the privacy analysis.
* `gradient_accumulation_steps` (k) is the number of micro-steps the HF loop runs per logical step on each
  device. The logical batch (this device's share of it) is split into k near-equal chunks; a chunk larger than
  `per_device_train_batch_size` is processed in several forwards inside the same micro-step. The optimizer and
  the privacy accountant step exactly once per logical step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

SAMPLING_SCHEMES = ("poisson", "truncated_poisson", "shuffle")
ACCOUNTANTS = ("pld", "rdp")
PRIVACY_UNITS = ("sequence", "user")

# planner key -> DPTrainingArguments field
_PLAN_FIELDS = {
    "logical_batch_size": "logical_batch_size",
    "steps": "max_steps",
    "noise_multiplier": "noise_multiplier",
    "target_epsilon": "target_epsilon",
    "target_delta": "target_delta",
    "sampling": "sampling",
    "accountant": "accountant",
}
# value a field has when the user did not set it
_UNSET = {"max_steps": -1}


@dataclass
class DPTrainingArguments(TrainingArguments):
    """Arguments of [`DPTrainer`]: all of `TrainingArguments` plus the DP-SGD ones.

    Exactly one of `noise_multiplier` (σ) and `target_epsilon` must be given (or a `plan` that provides them).
    The Trainer's own gradient clipping (`max_grad_norm`) is replaced by per-sequence clipping
    (`per_sample_max_grad_norm`) and must stay 0.
    """

    per_sample_max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "Clipping norm C: the gradient of each sequence (all trainable parameters jointly) is scaled to "
            "L2 norm at most C before summing. The Gaussian noise has standard deviation noise_multiplier * C."
        },
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Noise multiplier sigma (noise std / C). Give this OR target_epsilon. sigma = 0 is a "
            "NON-PRIVATE control run (loud warnings, the model card says NOT PRIVATE)."
        },
    )
    target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Privacy budget epsilon at target_delta. Give this OR noise_multiplier: sigma is then calibrated "
            "so that the planned number of steps spends at most this budget; training stops when it is reached."
        },
    )
    target_delta: float | None = field(
        default=None,
        metadata={
            "help": "delta of the (epsilon, delta) guarantee. Default: min(1e-5, 1/(10 N)) for a training set of N "
            "privacy units, as in `vaultgemma-hf plan` (always < 1/N); a value >= 1/N is allowed but warned about."
        },
    )
    logical_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "EXPECTED number of sequences per optimizer step (Poisson sampling rate q = "
            "logical_batch_size / N). Required. per_device_train_batch_size is only the physical micro-batch."
        },
    )
    sampling: Literal["poisson", "truncated_poisson", "shuffle"] | None = field(
        default=None,
        metadata={
            "help": "How logical batches are drawn: 'poisson' (default; variable size, empty batches still step), "
            "'truncated_poisson' (Poisson, then capped at max_physical_batch; fixed physical shapes) or 'shuffle' "
            "(fixed-size batches of a shuffled epoch; needs --allow_shuffled_batches_without_amplification)."
        },
    )
    allow_shuffled_batches_without_amplification: bool = field(
        default=False,
        metadata={
            "help": "Opt-in for sampling='shuffle'. Shuffled batches do not enjoy Poisson privacy amplification; "
            "the accountant accounts for them honestly (a weaker guarantee) and logs and the model card flag it."
        },
    )
    max_physical_batch: int | None = field(
        default=None,
        metadata={
            "help": "truncated_poisson only: the cap on sequences per logical step (all devices together). Default "
            "per_device_train_batch_size * gradient_accumulation_steps * world_size; must not exceed it."
        },
    )
    accountant: Literal["pld", "rdp"] | None = field(
        default=None,
        metadata={"help": "Privacy accountant of dp_accounting: 'pld' (default, tight) or 'rdp' (faster, looser)."},
    )
    privacy_unit: Literal["sequence", "user"] = field(
        default="sequence",
        metadata={
            "help": "'sequence' (default): each training sequence is protected. 'user': each user is sampled as a "
            "unit (Poisson over users) and contributes one of their sequences, chosen at random, per step; the "
            "dataset must carry a user id column (see user_id_column)."
        },
    )
    user_id_column: str = field(
        default="user_id",
        metadata={"help": "privacy_unit='user' only: the key of each example holding its user id."},
    )
    plan: str | None = field(
        default=None,
        metadata={
            "help": "Path to a JSON plan written by `vaultgemma-hf plan --json`. It fills logical_batch_size, "
            "max_steps, noise_multiplier, target_epsilon, target_delta, sampling and accountant; explicitly given "
            "values that differ from the plan are an error. Training refuses to start if the train dataset's size "
            "or sequence length differ from the plan's, or if the plan's steps would exceed its target_epsilon."
        },
    )
    plan_index: int | None = field(
        default=None,
        metadata={"help": "Which entry of a plan file listing several plans to use."},
    )
    deterministic_noise_for_testing: bool = field(
        default=False,
        metadata={
            "help": "TESTING ONLY: seed batch sampling and noise from `seed` instead of fresh OS entropy. The run is "
            "reproducible, which means its noise is known to anyone who knows the seed. Logged loudly and written "
            "in the model card."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Must stay 0 in DPTrainer: clipping is per sequence (per_sample_max_grad_norm); clipping the "
            "noisy aggregate would change the update direction after the fact and is refused."
        },
    )

    def __post_init__(self) -> None:
        self._validate_dp_fields()
        super().__post_init__()
        self._validate_trainer_fields()

    # ---------------------------------------------------------------------------------------------- validation
    def _validate_dp_fields(self) -> None:
        self.plan_info: dict[str, Any] | None = None
        if self.plan is not None:
            self._apply_plan()
        elif self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                "Give either noise_multiplier or target_epsilon, not both: with target_epsilon the noise multiplier "
                f"is calibrated (got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})."
            )
        elif self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "DPTrainingArguments needs target_epsilon (noise calibrated to the budget) or noise_multiplier "
                "(sigma given; use noise_multiplier=0 only for an explicitly non-private control run), or a plan."
            )

        if self.sampling is None:
            self.sampling = "poisson"
        if self.accountant is None:
            self.accountant = "pld"
        if self.sampling not in SAMPLING_SCHEMES:
            raise ValueError(f"sampling must be one of {SAMPLING_SCHEMES}, got {self.sampling!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {self.privacy_unit!r}.")

        if self.sampling == "shuffle" and not self.allow_shuffled_batches_without_amplification:
            raise ValueError(
                "sampling='shuffle' draws fixed-size batches from a shuffled epoch; they do not get the privacy "
                "amplification of Poisson sampling that the usual DP-SGD guarantee assumes. Use sampling='poisson' "
                "(or 'truncated_poisson'), or opt in with allow_shuffled_batches_without_amplification=True: the "
                "accountant then accounts for shuffling honestly and the model card flags it."
            )
        if self.sampling == "truncated_poisson" and self.accountant == "rdp":
            raise ValueError(
                "accountant='rdp' cannot account for sampling='truncated_poisson' (dp_accounting's RDP accountant has "
                "no truncated Poisson event); use accountant='pld'."
            )
        if self.sampling == "shuffle" and self.privacy_unit == "user":
            raise ValueError(
                "privacy_unit='user' needs Poisson sampling of users; sampling='shuffle' is not supported."
            )
        if self.max_physical_batch is not None:
            if self.sampling != "truncated_poisson":
                raise ValueError(
                    f"max_physical_batch only applies to sampling='truncated_poisson' (got sampling={self.sampling!r})."
                )
            if self.max_physical_batch < 1:
                raise ValueError(f"max_physical_batch must be >= 1, got {self.max_physical_batch}.")

        if self.logical_batch_size is None:
            raise ValueError(
                "logical_batch_size is required: it is the EXPECTED number of sequences per optimizer step and sets "
                "the sampling rate q = logical_batch_size / N. per_device_train_batch_size is only the physical "
                "micro-batch (memory) and does not define the batch of the privacy analysis."
            )
        if not isinstance(self.logical_batch_size, int) or self.logical_batch_size < 1:
            raise ValueError(f"logical_batch_size must be a positive integer, got {self.logical_batch_size!r}.")
        if not (self.per_sample_max_grad_norm > 0 and math.isfinite(self.per_sample_max_grad_norm)):
            raise ValueError(
                f"per_sample_max_grad_norm (C) must be a positive finite number, got {self.per_sample_max_grad_norm}."
            )
        if self.noise_multiplier is not None and not (
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)
        ):
            raise ValueError(f"noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}.")
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon must be > 0 and finite, got {self.target_epsilon}.")
        if self.target_delta is not None and not (0 < self.target_delta < 1):
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}.")

        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={self.max_grad_norm} asks the Trainer to clip the aggregated (already noised) "
                "gradient, which DPTrainer refuses: clipping is per sequence with per_sample_max_grad_norm "
                f"(C={self.per_sample_max_grad_norm}). Leave max_grad_norm at 0."
            )
        self.max_grad_norm = 0.0

        if self.is_non_private:
            logger.warning(
                "noise_multiplier=0: this is a NON-PRIVATE control run. Nothing about it is differentially private; "
                "the model card will say NOT PRIVATE."
            )
        if self.deterministic_noise_for_testing:
            logger.warning(
                "deterministic_noise_for_testing=True: batch sampling and DP noise are seeded from seed=%s. The noise "
                "is reproducible by anyone who knows the seed, so the run is NOT private in practice. Testing only.",
                self.seed,
            )
        if self.sampling == "shuffle":
            logger.warning(
                "sampling='shuffle' (opted in): batches are fixed-size slices of a shuffled epoch, accounted without "
                "Poisson amplification. The guarantee is weaker than with Poisson sampling; the model card says so."
            )

    def _apply_plan(self) -> None:
        from vaultgemma_hf.planning import load_plan  # written by the planner; imported lazily

        plan = load_plan(self.plan, index=self.plan_index)
        missing = [key for key in _PLAN_FIELDS if plan.get(key) is None]
        if missing:
            raise ValueError(f"Plan {self.plan!r} lacks {missing}; cannot configure DP training from it.")
        conflicts = []
        for key, name in _PLAN_FIELDS.items():
            current = getattr(self, name)
            planned = plan[key]
            if current is not None and current != _UNSET.get(name) and not _same(current, planned):
                conflicts.append(f"{name}={current!r} (plan: {planned!r})")
        if conflicts:
            raise ValueError(
                f"Values given explicitly conflict with the plan {self.plan!r}: {', '.join(conflicts)}. Drop them to "
                "use the plan, or drop --plan."
            )
        for key, name in _PLAN_FIELDS.items():
            value = plan[key]
            if name in ("logical_batch_size", "max_steps"):
                value = int(value)
            setattr(self, name, value)
        self.plan_info = dict(plan)

    def _validate_trainer_fields(self) -> None:
        if self.fp16:
            raise ValueError(
                "fp16 is not supported by DPTrainer: its loss scaler would rescale the noised DP gradient. Use bf16 "
                "(autocast; clipping and noise stay in fp32) or fp32."
            )
        if self.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not supported: the DP loss is the per-sequence mean token cross-entropy."
            )
        if self.train_sampling_strategy not in ("random", None):
            raise ValueError(
                f"train_sampling_strategy={self.train_sampling_strategy!r} is not used by DPTrainer: batches are drawn "
                f"by the DP sampler (sampling={self.sampling!r}). Leave it at its default."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size is not supported by DPTrainer: after an out-of-memory error it restarts the "
                "training loop with a smaller batch, in the middle of a logical DP step. per_device_train_batch_size "
                "only sets the micro-batch (memory), never the privacy analysis: set it directly."
            )
        if self.torch_compile:
            raise ValueError(
                "torch_compile is not supported by DPTrainer: the DP engine clips per sequence with module hooks "
                "that a compiled graph does not run, so the per-sequence gradients could not be recorded."
            )
        if self.deepspeed or self.fsdp:
            raise ValueError("DPTrainer supports one device or DDP (torchrun/accelerate); DeepSpeed and FSDP are not.")
        self._validate_parallelism()
        self._validate_optimizer()
        if getattr(self, "activation_checkpointing", False) or getattr(self, "gradient_checkpointing", False):
            raise ValueError(
                "activation (gradient) checkpointing is not supported: the DP engine records each module's forward "
                "once and cannot follow recomputation. Use a smaller per_device_train_batch_size instead."
            )
        if getattr(self, "neftune_noise_alpha", None):
            raise ValueError("neftune_noise_alpha is not supported by DPTrainer (it hooks the embedding forward).")
        if getattr(self, "use_liger_kernel", False):
            raise ValueError("use_liger_kernel is not supported: DPTrainer needs the logits for per-sequence losses.")
        if self.dataloader_drop_last:
            logger.warning(
                "dataloader_drop_last=True has no effect on DPTrainer's training batches: every logical step is one "
                "Poisson (or shuffled) draw of logical_batch_size sequences in expectation, and none is dropped (the "
                "accountant counts every step). It still applies to evaluation dataloaders."
            )
        if self.data_seed is not None:
            logger.warning(
                "data_seed=%s is not used to draw DPTrainer's training batches: they are sampled with fresh OS "
                "entropy on every run (or from seed with deterministic_noise_for_testing, testing only), so the "
                "batches are not reproducible from data_seed.",
                self.data_seed,
            )
        if self.gradient_accumulation_steps > self.logical_batch_size:
            logger.warning(
                "gradient_accumulation_steps=%d > logical_batch_size=%d: most micro-steps will be empty.",
                self.gradient_accumulation_steps,
                self.logical_batch_size,
            )

    def _validate_parallelism(self) -> None:
        """Refuses an accelerate `ParallelismConfig` that splits one sequence or one model over several devices.

        Context / sequence parallelism give each device a slice of every sequence and tensor parallelism a slice of
        every layer; each device would then clip its own partial per-sequence gradient to C, so one sequence could
        contribute up to (number of devices) x C (the sensitivity the noise is calibrated to is C). Sharded data
        parallelism (`dp_shard_size`) is FSDP. Only replicated data parallelism (DDP) is supported.
        """
        config = self.parallelism_config
        if config is None:
            return
        split = {
            name: int(getattr(config, name, 1) or 1)
            for name in ("tp_size", "cp_size", "sp_size", "dp_shard_size")
            if int(getattr(config, name, 1) or 1) > 1
        }
        if split:
            sizes = ", ".join(f"{name}={size}" for name, size in split.items())
            raise ValueError(
                f"parallelism_config with {sizes} is not supported by DPTrainer: tensor, context and sequence "
                "parallelism give each device a slice of every layer or sequence, so each device would clip its "
                "own partial per-sequence gradient to C and one sequence could contribute several times C (the "
                "noise is calibrated to C); dp_shard_size is FSDP. Use replicated data parallelism (DDP) only."
            )

    def _validate_optimizer(self) -> None:
        """Refuses optimizers that update the weights during backward, before clipping and noise.

        LOMO / AdaLomo fuse the update into the backward pass, and the layer-wise GaLore / APOLLO variants step
        each parameter from a hook that fires when autograd accumulates its gradient. DPTrainer writes the clipped,
        noised gradient after the backward passes of a whole logical step and then calls `optimizer.step()`, so
        these optimizers would either update with raw, unclipped, un-noised gradients or never see the DP gradient.
        """
        optim = str(getattr(self.optim, "value", self.optim)).lower()
        if optim in ("lomo", "adalomo") or optim.endswith("layerwise"):
            raise ValueError(
                f"optim={optim!r} is not supported by DPTrainer: it updates the weights during the backward pass "
                "(fused or layer-wise per-parameter hooks), from the raw per-batch gradient, before DPTrainer has "
                "clipped each sequence's gradient and added the noise; the update would not be differentially "
                "private (or would ignore the DP gradient). Use an optimizer that steps on .grad, e.g. adamw_torch."
            )

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def is_non_private(self) -> bool:
        """True for the explicit non-private control (noise_multiplier == 0)."""
        return self.noise_multiplier is not None and self.noise_multiplier == 0

    def planned_num_steps(self, dataset_size: int) -> int:
        """Number of logical steps training will run on a dataset of `dataset_size` privacy units.

        `max_steps` when set, else `ceil(num_train_epochs * steps_per_epoch)` with `steps_per_epoch` from
        [`~vaultgemma_hf.dp.sampling.steps_per_epoch`] (the same formula the HF loop applies to our dataloader).
        """
        from vaultgemma_hf.dp.sampling import steps_per_epoch

        if self.max_steps is not None and self.max_steps > 0:
            return int(self.max_steps)
        per_epoch = steps_per_epoch(dataset_size, self.logical_batch_size, self.sampling)
        return int(math.ceil(self.num_train_epochs * per_epoch))

    def default_target_delta(self, dataset_size: int) -> float:
        """`target_delta` if given, else the planner's default, min(1e-5, 1 / (10 N)) (always below 1/N)."""
        if self.target_delta is not None:
            return float(self.target_delta)
        if dataset_size < 2:
            raise ValueError("A training set of fewer than 2 privacy units cannot get a meaningful default delta.")
        from vaultgemma_hf.dp.accounting import default_delta

        return default_delta(dataset_size)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b

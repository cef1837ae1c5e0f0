"""`DPTrainer`: DP-SGD continued pretraining through the Hugging Face `Trainer` loop.

The HF loop is kept as it is; a few hooks are overridden:

* `get_train_dataloader` returns a `DataLoader` driven by [`DPBatchSampler`]: each logical DP-SGD step is exactly
  `gradient_accumulation_steps` micro-batches per process, carrying a per-example mask (padding / empty batches).
  It is not passed through `accelerator.prepare`: the sampler is already rank-aware (see `dp/sampling.py`).
* `training_step` computes per-sequence losses (mean token cross-entropy, [`per_example_causal_lm_loss`]) in
  chunks of at most `per_device_train_batch_size` and hands them to the [`DPGradientEngine`], which accumulates
  per-sequence clipped gradients. On the last micro-batch of a logical step (the Trainer's own `sync_gradients`
  flag) it calls `engine.finalize_step`: the clipped sums are all-reduced across processes, Gaussian noise is
  added once, the result divided by `logical_batch_size` is written to `.grad`, and the accountant steps once.
  The Trainer then runs the optimizer and scheduler exactly as usual (its own clipping is disabled).
* The forward runs on the unwrapped module, so DDP never all-reduces the (unclipped) gradients itself.
* `log` adds ``epsilon`` (and clipping statistics) to the training logs; `save_model` writes the accountant state
  (``dp_state.json``, atomic) and the model card (``README.md``) next to the weights; `train` restores the
  accountant from a checkpoint on resume, calibrates σ, and refuses to start when the plan exceeds the budget
  (or, with shuffled batches, when it would continue from the middle of an epoch).

Sampling and noise use fresh OS entropy for every run (reproducible only with the explicit testing flag); their
generator states are never written to or read from checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils.memory import clear_device_cache  # what the HF Trainer uses for torch_empty_cache_steps
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from vaultgemma_hf.atomic_files import atomic_write_text
from vaultgemma_hf.data.packing import check_sequence_length, group_indices_by_user, token_ids_sha256
from vaultgemma_hf.dp.sampling import DPBatchSampler, fresh_generator, sampling_rate, steps_per_epoch
from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.trainer.batching import EXAMPLE_MASK_KEY, MaskedCollator, MaskedDataset, check_rows, slice_batch
from vaultgemma_hf.trainer.losses import IGNORE_INDEX, per_example_causal_lm_loss
from vaultgemma_hf.trainer.model_card import DPTrainingSummary, write_model_card
from vaultgemma_hf.trainer.training_args import DPTrainingArguments

logger = logging.get_logger(__name__)

#: File written into every checkpoint / saved model with the accountant state and the DP configuration.
DP_STATE_NAME = "dp_state.json"
DP_STATE_VERSION = 1
# relative slack when comparing an ε recomputed from the same inputs with a target
_EPS_RTOL = 1e-9
_CHECKPOINT_RE = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")


def deterministic_seeds(seed: int, rank: int) -> tuple[int, int]:
    """(sampler seed, noise seed) used on process `rank` when `deterministic_noise_for_testing` is set.

    The sampler seed is the same on every process (they must draw the same global batch); the noise seed is
    distinct per process (only rank 0 adds noise).
    """
    return int(seed), int(seed) * 1_000_003 + 7919 * (int(rank) + 1)


def _dp_accounting_version() -> str:
    try:
        return version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover - dp_accounting is a hard dependency
        return "unknown"


class DPTrainer(Trainer):
    """`Trainer` for DP-SGD continued pretraining of causal language models.

    Use it like `Trainer`, with [`DPTrainingArguments`]; the model is trained on per-sequence clipped, noised
    gradients and the privacy spent is tracked by a `dp_accounting` accountant. The training set must be a
    map-style dataset of sequences with ``input_ids`` and ``labels`` (see
    [`~vaultgemma_hf.data.packing.pack_documents`]).

    Example:

    ```python
    args = DPTrainingArguments(output_dir="out", target_epsilon=8.0, logical_batch_size=256,
                               per_device_train_batch_size=8, max_steps=100, learning_rate=1e-4)
    trainer = DPTrainer(model=model, args=args, train_dataset=packed, data_collator=DataCollatorForPackedSequences())
    trainer.train()
    trainer.get_epsilon()
    ```
    """

    def __init__(self, model: torch.nn.Module | None = None, args: DPTrainingArguments | None = None, **kwargs: Any):
        if not isinstance(args, DPTrainingArguments):
            raise TypeError("DPTrainer needs `args` to be a DPTrainingArguments instance.")
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "model_init / hyperparameter search is not supported by DPTrainer: every trial would spend privacy "
                "budget on the same data, which one accountant cannot report. Pass a model."
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not supported: the DP loss is the per-sequence mean token CE.")
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                "DPTrainer does not support torch.nn.DataParallel (several GPUs in one process); launch one process "
                "per GPU with torchrun / accelerate (DDP)."
            )
        from vaultgemma_hf.dp.engine import DPGradientEngine

        self.dp_engine = DPGradientEngine(self.model, self.args.per_sample_max_grad_norm)
        self.privacy_accountant = None
        self.noise_multiplier: float | None = None
        self.sampling_rate: float | None = None
        self.target_delta: float | None = None
        self._dp_num_units: int | None = None
        self._dp_groups: list[list[int]] | None = None
        self._dp_dataset_sha256: str | None = None
        self._dp_seq_len: int | None = None
        self._dp_budget_steps: int | None = None
        self._dp_sampler_generator: torch.Generator | None = None
        self._dp_noise_generator: torch.Generator | None = None
        self._dp_micro_steps = 0
        self._dp_norm_stats: torch.Tensor | None = None  # examples, sum of per-example norms, clipped examples
        self._dp_logged_steps = 0
        self._dp_eps_cache: tuple[int, float] | None = None
        # whether any step of the run (resumed parts included) used seeded, reproducible noise (testing only)
        self._dp_seeded_noise = False
        self._dp_last_mask: torch.Tensor | None = None
        self._check_eval_driven_choices()
        self.add_callback(DPCallback(self))

    # ------------------------------------------------------------------------------------------------ public API
    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at `delta` (default: `target_delta`); 0 before the first step, ∞ when σ = 0."""
        if self.privacy_accountant is None or self.privacy_accountant.steps == 0:
            return 0.0
        delta = self.target_delta if delta is None else delta
        steps = self.privacy_accountant.steps
        if delta == self.target_delta and self._dp_eps_cache is not None and self._dp_eps_cache[0] == steps:
            return self._dp_eps_cache[1]
        epsilon = float(self.privacy_accountant.get_epsilon(delta))
        if delta == self.target_delta:
            self._dp_eps_cache = (steps, epsilon)
        return epsilon

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: every trial trains on the same private data and spends privacy budget.

        Raises:
            ValueError: Always; the message explains why.
        """
        raise ValueError(
            "hyperparameter_search is not supported by DPTrainer: every trial trains on the same private data and "
            "spends privacy budget, and choosing the best trial uses that data again; the epsilon of one run's "
            "accountant covers none of this. Tune hyperparameters on public or held-out non-sensitive data, or "
            "account for all trials together."
        )

    def _check_eval_driven_choices(self) -> None:
        """Refuses (or warns about) training decisions driven by evaluation metrics.

        `load_best_model_at_end` picks the released weights, and the ``reduce_lr_on_plateau`` scheduler sets the
        learning rate, from evaluation metrics computed without noise. On the training data itself that choice is
        a non-private function of the data that the accountant does not count: refused. On another evaluation set
        the guarantee covers the choice only if that set is public (or not sensitive): warned.

        Raises:
            ValueError: If such a choice is made on the training dataset itself.
        """
        args = self.args
        scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        uses = [name for name, on in (
            ("load_best_model_at_end", args.load_best_model_at_end),
            ("lr_scheduler_type='reduce_lr_on_plateau'", scheduler == "reduce_lr_on_plateau"),
        ) if on]  # fmt: skip
        if not uses:
            return
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, Mapping) else [self.eval_dataset]
        if self.train_dataset is not None and any(e is self.train_dataset for e in evals):
            raise ValueError(
                f"{' and '.join(uses)} with the training dataset as eval_dataset is refused: the choice (released "
                "checkpoint or learning rate) would be made from noise-free metrics of the private training data, "
                "which the privacy accountant does not count, so the released model would not have the reported "
                "guarantee. Evaluate on public (or non-sensitive held-out) data, or turn the option off."
            )
        logger.warning(
            "%s: the choice is made from evaluation metrics computed without noise. The DP guarantee covers it only "
            "if the evaluation data is public (not sensitive); on private evaluation data the released model is not "
            "covered by the reported epsilon.",
            " and ".join(uses),
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """Sets up privacy (calibration, budget check, accountant restore on resume), then runs `Trainer.train`."""
        if trial is not None:
            raise ValueError("Hyperparameter search trials are not supported by DPTrainer.")
        if isinstance(resume_from_checkpoint, bool):
            if resume_from_checkpoint:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            else:
                resume_from_checkpoint = None
        self.setup_privacy(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=None, **kwargs)

    # ------------------------------------------------------------------------------------------------ privacy setup
    def _accountant_kwargs(self) -> dict[str, Any]:
        args = self.args
        return {
            "accountant": args.accountant,
            "sampling": args.sampling,
            "dataset_size": self._dp_num_units,
            "max_batch_size": self._max_physical_batch() if args.sampling == "truncated_poisson" else None,
            "logical_batch_size": args.logical_batch_size,
        }

    def _max_physical_batch(self) -> int:
        args = self.args
        capacity = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return capacity if args.max_physical_batch is None else int(args.max_physical_batch)

    def _privacy_units(self) -> tuple[int, list[list[int]] | None]:
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset.")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "DPTrainer needs a map-style training dataset with a length: Poisson sampling draws each sequence "
                "independently at every step, which an IterableDataset cannot do."
            )
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty.")
        if self.args.privacy_unit == "sequence":
            return len(dataset), None
        if hasattr(dataset, "groups") and getattr(dataset, "user_ids", None) is not None:
            groups = dataset.groups()
        else:
            column = self.args.user_id_column
            try:
                user_ids = [dataset[i][column] for i in range(len(dataset))]
            except (KeyError, TypeError) as err:
                raise ValueError(
                    f"privacy_unit='user' needs every example to carry its user id under {column!r}."
                ) from err
            groups = group_indices_by_user(user_ids)
        return len(groups), groups

    def _check_sequences(self) -> None:
        dataset = self.train_dataset
        first = dataset[0]
        if not isinstance(first, Mapping) or "input_ids" not in first:
            raise ValueError("Each training example must be a dict with 'input_ids' (and 'labels').")
        self._dp_seq_len = int(getattr(dataset, "seq_len", None) or len(first["input_ids"]))
        check_sequence_length(self._dp_seq_len, self._max_positions())

    def _max_positions(self) -> int | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None)

    def _dataset_sha256(self) -> str:
        if self._dp_dataset_sha256 is None:
            dataset = self.train_dataset
            if hasattr(dataset, "sha256"):
                self._dp_dataset_sha256 = dataset.sha256()
            else:
                self._dp_dataset_sha256 = token_ids_sha256(dataset[i] for i in range(len(dataset)))
        return self._dp_dataset_sha256

    def _compute_epsilon(self, steps: int) -> float:
        from vaultgemma_hf.dp.accounting import compute_epsilon

        if steps == 0:
            return 0.0
        return float(
            compute_epsilon(
                self.noise_multiplier, self.sampling_rate, steps, self.target_delta, **self._accountant_kwargs()
            )
        )

    def _max_steps_within(self, target_epsilon: float, upper: int) -> int:
        """Largest number of steps t <= upper with ε(t) <= target (binary search; ε grows with t)."""
        low, high = 0, upper
        while low < high:
            mid = (low + high + 1) // 2
            if self._compute_epsilon(mid) <= target_epsilon * (1 + _EPS_RTOL):
                low = mid
            else:
                high = mid - 1
        return low

    def setup_privacy(self, resume_from_checkpoint: str | None = None) -> None:
        """Resolves N, q, δ and σ, restores or creates the accountant, checks the budget and seeds the RNGs.

        Called by `train`; safe to call again (a second `train()` on the same trainer continues the same
        accountant: the model has already spent that budget; its privacy parameters may not change in between). The
        clipped sums of a logical step left unfinished by an interrupted `train()` are discarded.

        Raises:
            ValueError: Invalid data or arguments, a plan over the budget, a resume or continuation with other
                privacy parameters, or a clipping norm changed after the DP engine was built.
        """
        from vaultgemma_hf.dp.accounting import PrivacyAccountant, calibrate_noise_multiplier, pld_precision_warning

        args = self.args
        if self.dp_engine is None:
            raise RuntimeError("The DP engine of this trainer was detached.")
        if not _same(float(args.per_sample_max_grad_norm), self.dp_engine.max_grad_norm):
            # the engine clips (and scales the noise) with the C it was built with; the card would report another
            raise ValueError(
                f"per_sample_max_grad_norm={args.per_sample_max_grad_norm!r} differs from the clipping norm "
                f"C={self.dp_engine.max_grad_norm!r} the DP engine of this trainer was built with (and clips with). Set "
                "it before building the DPTrainer; to change it, build a new DPTrainer."
            )
        num_units, groups = self._privacy_units()
        self._check_sequences()
        q = sampling_rate(num_units, args.logical_batch_size)
        if resume_from_checkpoint is None and self.privacy_accountant is not None:
            self._check_continuation(num_units, q)  # before anything of the running configuration is replaced
        self._dp_num_units, self._dp_groups, self.sampling_rate = num_units, groups, q
        if args.sampling == "truncated_poisson":
            # validates max_physical_batch against the physical capacity of a logical step
            DPBatchSampler(
                num_units,
                args.logical_batch_size,
                sampling=args.sampling,
                micro_batches_per_step=args.gradient_accumulation_steps,
                micro_batch_size=args.per_device_train_batch_size,
                generator=torch.Generator(),
                max_batch_size=args.max_physical_batch,
                world_size=args.world_size,
            )
            if self._max_physical_batch() < args.logical_batch_size:
                logger.warning(
                    "max_physical_batch=%d is below logical_batch_size=%d: most logical batches will be truncated.",
                    self._max_physical_batch(),
                    args.logical_batch_size,
                )
        self.target_delta = args.default_target_delta(num_units)
        if self.target_delta >= 1.0 / num_units:
            logger.warning(
                "target_delta=%g is >= 1/N = %g: a mechanism that publishes one random training sequence in the clear "
                "satisfies such a delta. Use delta well below 1/N.",
                self.target_delta,
                1.0 / num_units,
            )
        if args.plan_info is not None:
            self._check_plan(args.plan_info, num_units, q)

        planned = args.planned_num_steps(num_units)
        state = self._read_dp_state(resume_from_checkpoint) if resume_from_checkpoint else None
        if state is not None:
            self._check_resume_state(state, num_units, q)
            self._warn_if_later_checkpoints(resume_from_checkpoint, state)
            self.noise_multiplier = float(state["noise_multiplier"])
            done = int(state["accountant_steps"])
            # a run resumed from a seeded (testing) checkpoint stays a testing run in its card and dp_state.json
            self._dp_seeded_noise = bool(state.get("deterministic_noise_for_testing", False))
            total = max(planned, done)
        elif self.privacy_accountant is not None:
            done = self.privacy_accountant.steps
            # the HF loop starts a fresh epoch (a fresh permutation) on every train() call
            self._check_shuffle_epoch_boundary(num_units, done, "this trainer's previous train() call")
            total = done + planned
        else:
            done, total = 0, planned
            self._warn_if_base_model_was_trained_on_this_data()
            if args.noise_multiplier is not None:
                self.noise_multiplier = float(args.noise_multiplier)
            else:
                try:
                    self.noise_multiplier = float(
                        calibrate_noise_multiplier(
                            args.target_epsilon, q, planned, self.target_delta, **self._accountant_kwargs()
                        )
                    )
                except ValueError as err:
                    raise ValueError(
                        f"target_epsilon={args.target_epsilon} (delta={self.target_delta:g}) cannot be reached with "
                        f"{planned} steps at sampling rate q={q:.6g} (logical_batch_size={args.logical_batch_size}, "
                        f"N={num_units}, sampling={args.sampling}, accountant={args.accountant}): {err}"
                    ) from err
                logger.info(
                    "Calibrated noise_multiplier=%.6g for target epsilon=%g at delta=%g over %d steps (q=%.6g).",
                    self.noise_multiplier,
                    args.target_epsilon,
                    self.target_delta,
                    planned,
                    q,
                )

        non_private = self.noise_multiplier == 0
        if non_private:
            logger.warning(
                "NON-PRIVATE control run: noise_multiplier=0, epsilon is infinite. Do not release this model as private."
            )
        else:
            precision = pld_precision_warning(self.target_delta, total) if args.accountant == "pld" else None
            if precision:
                logger.warning("Privacy accounting: %s", precision)
        self._dp_budget_steps = None
        if args.target_epsilon is not None and not non_private:
            final_epsilon = self._compute_epsilon(total)
            if final_epsilon > args.target_epsilon * (1 + _EPS_RTOL):
                reachable = self._max_steps_within(args.target_epsilon, total)
                raise ValueError(
                    f"Refusing to start: the plan of {total} steps in total ({done} already done) with "
                    f"noise_multiplier={self.noise_multiplier:.6g} and q={q:.6g} would spend epsilon="
                    f"{final_epsilon:.4g} > target_epsilon={args.target_epsilon} at delta={self.target_delta:g}. "
                    f"At most {reachable} steps fit in the budget."
                )
            self._dp_budget_steps = total
            logger.info(
                "Planned: %d steps in total, final epsilon=%.4g (target %g).",
                total,
                final_epsilon,
                args.target_epsilon,
            )

        if state is not None or self.privacy_accountant is None:
            self.privacy_accountant = PrivacyAccountant(self.noise_multiplier, q, **self._accountant_kwargs())
            if state is not None:
                self.privacy_accountant.load_state_dict(state["accountant"])
                if self.privacy_accountant.steps != done:
                    raise RuntimeError("The restored accountant does not report the steps recorded in dp_state.json.")
                logger.info("Restored the privacy accountant from %s: %d steps done.", resume_from_checkpoint, done)
        self._dp_eps_cache = None
        self._discard_partial_step()
        self._seed_generators()
        self._dp_micro_steps = 0
        self._dp_norm_stats = None
        self._dp_logged_steps = 0

    def _warn_if_base_model_was_trained_on_this_data(self) -> None:
        """Warns when the model was loaded from a DPTrainer output trained on the same data (same token SHA-256).

        Training such a model again with a *new* accountant (instead of `resume_from_checkpoint`) spends privacy on
        the same sequences twice, but this run's ε (logs, model card, ``dp_state.json``) counts only its own steps:
        the released model's ε is the composition of both runs, which is larger.
        """
        config = getattr(self.model, "config", None)
        source = getattr(config, "_name_or_path", None)
        path = os.path.join(str(source), DP_STATE_NAME) if source else None
        if path is None or not os.path.isfile(path) or not self.is_world_process_zero():
            return
        try:
            with open(path, encoding="utf-8") as handle:
                previous = json.load(handle)
        except (OSError, ValueError):
            return
        if not isinstance(previous, dict) or previous.get("dataset_sha256") != self._dataset_sha256():
            return
        logger.warning(
            "The model was loaded from %s, which DPTrainer already trained on this same training data (%s steps, "
            "epsilon=%s at delta=%s). This run starts a new accountant, so the epsilon it reports (logs, model card, "
            "dp_state.json) covers only its own steps; the released model's privacy loss on this data is the "
            "composition of both runs, which is larger. To continue the earlier run with one accountant, use "
            "train(resume_from_checkpoint=...) on its checkpoint instead.",
            source,
            previous.get("accountant_steps"),
            previous.get("epsilon"),
            previous.get("target_delta"),
        )

    def _check_continuation(self, num_units: int, q: float) -> None:
        """Refuses a second `train()` whose privacy parameters differ from those the running accountant composes.

        The accountant of this trainer keeps composing identical steps (its σ, q, sampling scheme, sizes); if the
        arguments or the training set changed since (e.g. a larger `logical_batch_size`, another dataset), the new
        steps would be drawn at another sampling rate but accounted at the old one, and ε under-reported.

        Args:
            num_units: N, the number of privacy units of the current training set.
            q: The sampling rate the sampler will now use.

        Raises:
            ValueError: If σ, q, the sampling scheme, the accountant or the sizes differ (the message names them).
        """
        from vaultgemma_hf.dp.accounting import PrivacyAccountant

        args = self.args
        mismatched = []
        if args.noise_multiplier is not None and not _same(float(args.noise_multiplier), self.noise_multiplier):
            mismatched.append(f"noise_multiplier: running {self.noise_multiplier!r}, now {args.noise_multiplier!r}")
        try:
            kwargs = {**self._accountant_kwargs(), "dataset_size": num_units}
            PrivacyAccountant(self.noise_multiplier, q, **kwargs).load_state_dict(self.privacy_accountant.state_dict())
        except ValueError as err:
            mismatched.append(str(err))
        if mismatched:
            raise ValueError(
                "Cannot continue training with different privacy parameters: this trainer's accountant composes "
                f"{self.privacy_accountant.steps} steps of {self.privacy_accountant!r} and would account the new steps "
                f"as the same mechanism (N={num_units}, q={q:.6g} now). " + "; ".join(mismatched) + ". Restore the "
                "arguments and training set, or build a new DPTrainer (its epsilon then does not cover this one's "
                "steps)."
            )

    def _discard_partial_step(self) -> None:
        """Drops clipped sums left by a logical step that never finished (e.g. `train()` interrupted mid-step).

        Those sums were never noised nor released; adding them to the next run's first step would release a second
        Poisson draw (and possibly the same sequence twice) in one step that the accountant counts as a single
        draw. Discarding them costs no privacy.
        """
        engine = self.dp_engine
        if engine._acc or engine.num_accumulated or self._dp_micro_steps:
            logger.warning(
                "Discarding the clipped gradients of %d sequence(s) from a logical step that did not finish (interrupted "
                "train()); they were never applied, and no privacy was spent on them.",
                engine.num_accumulated,
            )
        engine.zero_accumulator()

    def _check_plan(self, plan: dict[str, Any], num_units: int, q: float) -> None:
        if plan.get("dataset_size") is not None and int(plan["dataset_size"]) != num_units:
            raise ValueError(
                f"The plan was made for a training set of {plan['dataset_size']} privacy units but the train dataset "
                f"has {num_units}; the sampling rate and the guarantee would differ. Re-plan for N={num_units}."
            )
        if plan.get("sampling_rate") is not None and not math.isclose(float(plan["sampling_rate"]), q, rel_tol=1e-9):
            raise ValueError(f"The plan's sampling rate {plan['sampling_rate']} differs from q = L/N = {q}.")
        if (
            plan.get("seq_len") is not None
            and self._dp_seq_len is not None
            and int(plan["seq_len"]) != self._dp_seq_len
        ):
            raise ValueError(
                f"The plan assumes sequences of {plan['seq_len']} tokens but the training sequences have "
                f"{self._dp_seq_len}."
            )

    def _seed_generators(self) -> None:
        args = self.args
        device = args.device
        rank = args.process_index
        if args.deterministic_noise_for_testing:
            logger.warning(
                "deterministic_noise_for_testing=True: sampling and noise are seeded from seed=%d. NOT PRIVATE in "
                "practice; for tests only.",
                args.seed,
            )
            sampler_seed, noise_seed = deterministic_seeds(args.seed, rank)
            self._dp_seeded_noise = True
        else:
            sampler_seed = secrets.randbits(63)
            noise_seed = None
        if dist.is_available() and dist.is_initialized() and args.world_size > 1:
            # every process must draw the same global batch: share rank 0's seed
            holder = [sampler_seed]
            dist.broadcast_object_list(holder, src=0)
            sampler_seed = int(holder[0])
        self._dp_sampler_generator = fresh_generator(sampler_seed)
        self._dp_noise_generator = fresh_generator(noise_seed, device=device)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _dp_state(self) -> dict[str, Any]:
        args = self.args
        return {
            "format_version": DP_STATE_VERSION,
            "accountant": self.privacy_accountant.state_dict(),
            "accountant_steps": self.privacy_accountant.steps,
            "global_step": self.state.global_step,
            "epsilon": _json_float(self.get_epsilon()),
            "target_epsilon": args.target_epsilon,
            "target_delta": self.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "per_sample_max_grad_norm": args.per_sample_max_grad_norm,
            "logical_batch_size": args.logical_batch_size,
            "sampling": args.sampling,
            "accountant_kind": args.accountant,
            "max_physical_batch": self._max_physical_batch() if args.sampling == "truncated_poisson" else None,
            "dataset_size": self._dp_num_units,
            "privacy_unit": args.privacy_unit,
            "seq_len": self._dp_seq_len,
            "dataset_sha256": self._dataset_sha256(),
            "dp_accounting_version": _dp_accounting_version(),
            "deterministic_noise_for_testing": self._dp_seeded_noise,
        }

    def _read_dp_state(self, checkpoint: str) -> dict[str, Any]:
        path = os.path.join(checkpoint, DP_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"Cannot resume from {checkpoint}: it has no {DP_STATE_NAME}, so the privacy already spent is unknown."
            )
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        if state.get("format_version") != DP_STATE_VERSION:
            raise ValueError(f"{path} has an unsupported format_version {state.get('format_version')!r}.")
        return state

    def _check_resume_state(self, state: dict[str, Any], num_units: int, q: float) -> None:
        args = self.args
        expected = {
            "per_sample_max_grad_norm": args.per_sample_max_grad_norm,
            "logical_batch_size": args.logical_batch_size,
            "sampling": args.sampling,
            "accountant_kind": args.accountant,
            "dataset_size": num_units,
            "privacy_unit": args.privacy_unit,
            "target_delta": self.target_delta,
            "max_physical_batch": self._max_physical_batch() if args.sampling == "truncated_poisson" else None,
        }
        if args.noise_multiplier is not None:
            expected["noise_multiplier"] = float(args.noise_multiplier)
        mismatched = [
            f"{key}: checkpoint {state.get(key)!r}, now {value!r}"
            for key, value in expected.items()
            if not _same(state.get(key), value)
        ]
        if mismatched:
            raise ValueError(
                "Cannot resume with different privacy parameters (one accountant composes identical steps): "
                + "; ".join(mismatched)
            )
        if state.get("dataset_sha256") != self._dataset_sha256():
            raise ValueError(
                "Cannot resume: the training data differ from the checkpoint's (SHA-256 of the token ids changed)."
            )
        self._check_shuffle_epoch_boundary(
            num_units, int(state["accountant_steps"]), "the checkpoint", global_step=state.get("global_step")
        )

    def _warn_if_later_checkpoints(self, checkpoint: str, state: Mapping[str, Any]) -> None:
        """Warns when `checkpoint` is not the latest save of its run: resuming it starts a second training branch.

        Later saves of the same run (``checkpoint-N`` folders with a larger N next to `checkpoint`, or a model saved
        with its ``dp_state.json`` in the parent folder after more steps) were trained on the same data from the same
        start. Each branch's accountant composes only that branch's steps, so the ε reported for either one does not
        cover releasing both. Training is not refused: discarding the later saves is a legitimate reason to resume.

        Args:
            checkpoint: The checkpoint folder the run resumes from.
            state: Its ``dp_state.json`` (gives the step it was saved at).
        """
        if not self.is_world_process_zero():
            return
        checkpoint = os.path.abspath(checkpoint)
        parent = os.path.dirname(checkpoint)
        match = _CHECKPOINT_RE.match(os.path.basename(checkpoint))
        step = int(match.group(1)) if match else int(state.get("global_step") or 0)
        later: list[tuple[int, str]] = []
        try:
            entries = os.listdir(parent)
        except OSError:
            entries = []
        for name in entries:
            found = _CHECKPOINT_RE.match(name)
            if found and int(found.group(1)) > step and os.path.isdir(os.path.join(parent, name)):
                later.append((int(found.group(1)), os.path.join(parent, name)))
        later.sort()
        saved = os.path.join(parent, DP_STATE_NAME)
        if os.path.isfile(saved):
            try:
                with open(saved, encoding="utf-8") as handle:
                    saved_step = int(json.load(handle).get("global_step") or 0)
            except (OSError, ValueError, TypeError, AttributeError):
                saved_step = 0
            if saved_step > step:
                later.append((saved_step, f"the model saved in {parent} (step {saved_step})"))
        if not later:
            return
        logger.warning(
            "Resuming from %s (step %d), but later checkpoints of the same run exist: %s. Training from here starts a "
            "second branch on the same data. Each released branch is accounted separately (its accountant composes "
            "only its own steps), so the epsilon reported for one branch does not cover releasing both: releasing "
            "models of both branches would need the steps of both composed together (the shared ones once). Release "
            "models of only one branch, or delete the later checkpoints.",
            checkpoint,
            step,
            ", ".join(path for _, path in later),
        )

    def _check_shuffle_epoch_boundary(
        self, num_units: int, steps_done: int, source: str, global_step: int | None = None
    ) -> None:
        """Refuses to continue a ``sampling="shuffle"`` run from the middle of a shuffled epoch.

        The accountant composes one Gaussian per started epoch of ``floor(N / L)`` steps, which holds because each
        sequence is used at most once per epoch. The permutation of an epoch is never saved, so a run continued
        mid-epoch (a resume, where HF skips the batches already done of a *fresh* permutation, or a second
        `train()`) could use a sequence of the interrupted epoch again within what the accountant counts as one
        epoch. Continuing exactly at an epoch boundary (``steps_done`` and the HF ``global_step`` multiples of
        the epoch length) starts a fresh, separately accounted epoch and is allowed.

        Args:
            num_units: N, the number of privacy units.
            steps_done: Logical steps the accountant has already composed.
            source: What the run continues from (for the error message).
            global_step: The HF global step the loop resumes from (it decides which batches HF skips).

        Raises:
            ValueError: If a shuffle run would continue from the middle of an epoch.
        """
        args = self.args
        if args.sampling != "shuffle":
            return
        per_epoch = steps_per_epoch(num_units, args.logical_batch_size, "shuffle")
        for steps in (steps_done, global_step):
            if steps is not None and int(steps) % per_epoch:
                raise ValueError(
                    f"Cannot continue a sampling='shuffle' run from {source}: it stopped after {int(steps)} steps, "
                    f"in the middle of a shuffled epoch ({per_epoch} steps of {args.logical_batch_size} sequences "
                    f"per epoch: floor(N / logical_batch_size) with N={num_units}). The order of that epoch is not "
                    "saved (sampling randomness is never restored), so the continued run would reshuffle and could "
                    "use sequences of the interrupted epoch a second time within what the accountant counts as one "
                    "epoch, and the reported epsilon would be too small. Resume from a checkpoint saved at an epoch "
                    f"boundary (a global step that is a multiple of {per_epoch}, e.g. with save_steps={per_epoch}), "
                    "or train with Poisson sampling (sampling='poisson'), which can be resumed after any step."
                )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the model like `Trainer.save_model`, plus ``dp_state.json`` and the DP model card (README.md)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if self.args.should_save and self.privacy_accountant is not None:
            atomic_write_text(os.path.join(output_dir, DP_STATE_NAME), json.dumps(self._dp_state(), indent=2) + "\n")
            write_model_card(output_dir, self.dp_training_summary())

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Writes the DP model card (instead of the generic Trainer card) into `output_dir`."""
        if self.args.should_save and self.privacy_accountant is not None:
            write_model_card(self.args.output_dir, self.dp_training_summary())

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub`, with a warning about what the upload holds beyond the DP-protected weights.

        The upload includes the DP model card (with the training data's SHA-256) and ``dp_state.json``; with
        ``hub_strategy="checkpoint"`` / ``"all_checkpoints"`` also ``trainer_state.json`` (the training logs). None of
        these is covered by the guarantee (see docs/source/en/dp_trainer.md): they are uploaded as the HF Trainer
        would, and this says so once per call.
        """
        logger.warning(
            "push_to_hub uploads, besides the DP-trained weights, the model card's training-data SHA-256 and "
            "dp_state.json%s, which the differential-privacy guarantee does not cover. If the training data is "
            "sensitive, push a copy of the folder without them (and remove the hash row from README.md).",
            " and trainer_state.json (the training logs)"
            if self.args.hub_strategy in ("checkpoint", "all_checkpoints")
            else "",
        )
        return super().push_to_hub(*args, **kwargs)

    def dp_training_summary(self) -> DPTrainingSummary:
        """The facts of the run that the model card discloses."""
        args = self.args
        trainable, frozen, frozen_names = 0, 0, []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
                frozen_names.append(name)
        config = getattr(self.model, "config", None)
        base_model = getattr(config, "_name_or_path", None) or "unknown"
        return DPTrainingSummary(
            base_model=str(base_model),
            model_name=os.path.basename(os.path.abspath(args.output_dir)),
            privacy_unit=args.privacy_unit,
            epsilon=self.get_epsilon(),
            delta=self.target_delta,
            target_epsilon=args.target_epsilon,
            accountant=args.accountant,
            dp_accounting_version=_dp_accounting_version(),
            sampling=args.sampling,
            sampling_rate=self.sampling_rate,
            noise_multiplier=self.noise_multiplier,
            clip_norm=args.per_sample_max_grad_norm,
            logical_batch_size=args.logical_batch_size,
            max_physical_batch=self._max_physical_batch() if args.sampling == "truncated_poisson" else None,
            steps=self.privacy_accountant.steps,
            dataset_size=self._dp_num_units,
            dataset_sha256=self._dataset_sha256(),
            trainable_parameters=trainable,
            frozen_parameters=frozen,
            frozen_parameter_names=frozen_names,
            seq_len=self._dp_seq_len,
            base_model_type=getattr(config, "model_type", None),
            non_private=self.noise_multiplier == 0,
            shuffled_without_amplification=args.sampling == "shuffle",
            deterministic_noise_for_testing=self._dp_seeded_noise,
        )

    # ------------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """A `DataLoader` over DP logical batches (see [`DPBatchSampler`]), one process's share of each."""
        if self.privacy_accountant is None:
            self.setup_privacy()
        args = self.args
        dataset = self.train_dataset
        collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        sampler = DPBatchSampler(
            self._dp_num_units,
            args.logical_batch_size,
            sampling=args.sampling,
            micro_batches_per_step=args.gradient_accumulation_steps,
            micro_batch_size=args.per_device_train_batch_size,
            generator=self._dp_sampler_generator,
            max_batch_size=args.max_physical_batch,
            world_size=args.world_size,
            rank=args.process_index,
            groups=self._dp_groups,
        )
        params: dict[str, Any] = {
            "batch_sampler": sampler,
            "collate_fn": MaskedCollator(collator, dataset[0]),
            "num_workers": args.dataloader_num_workers,
            # pinned memory only speeds up copies to an accelerator (on CPU, torch warns that it is unused)
            "pin_memory": args.dataloader_pin_memory and args.device.type != "cpu",
        }
        if args.dataloader_num_workers > 0:
            params["persistent_workers"] = args.dataloader_persistent_workers
            params["prefetch_factor"] = args.dataloader_prefetch_factor
        return DataLoader(MaskedDataset(dataset), **params)

    # ------------------------------------------------------------------------------------------------ loss & step
    def compute_per_example_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Per-sequence mean token cross-entropy ``[B]`` (fp32) and the model outputs."""
        if "labels" not in inputs:
            raise ValueError("Training batches must contain 'labels' (use -100 for tokens that are not targets).")
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", EXAMPLE_MASK_KEY)}
        max_positions = self._max_positions()
        input_ids = model_inputs.get("input_ids")
        if max_positions is not None and input_ids is not None and input_ids.shape[-1] > max_positions:
            check_sequence_length(int(input_ids.shape[-1]), max_positions)
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return per_example_causal_lm_loss(logits, inputs["labels"]), outputs

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """Mean of the per-sequence losses over the sequences that have a target (used for evaluation)."""
        inputs = {k: v for k, v in inputs.items() if k != EXAMPLE_MASK_KEY}
        per_example, outputs = self.compute_per_example_loss(model, inputs)
        has_target = (inputs["labels"][:, 1:] != IGNORE_INDEX).any(dim=1).to(per_example.device)
        loss = per_example[has_target].sum() / has_target.sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One micro-batch: per-sequence losses -> engine backward (clipped accumulation); finalize on the last one."""
        args = self.args
        mask = inputs.pop(EXAMPLE_MASK_KEY, None)
        if mask is None:
            raise RuntimeError("DPTrainer.training_step received a batch that did not come from the DP sampler.")
        self._dp_last_mask = mask  # for include_num_input_tokens_seen: padding slots are not tokens seen
        check_rows(inputs, mask.shape[0])  # one row per example, or the per-row clipping is not per example
        module = self.accelerator.unwrap_model(model)  # bypass DDP: the engine reduces clipped sums itself
        module.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        mask = mask.to(args.device)
        batch_size = mask.shape[0]
        loss_sum = torch.zeros((), device=args.device, dtype=torch.float32)
        chunk = args.per_device_train_batch_size
        for start in range(0, batch_size, chunk):
            stop = min(start + chunk, batch_size)
            part = slice_batch(inputs, start, stop, batch_size)
            part_mask = mask[start:stop]
            with self.compute_loss_context_manager():
                per_example, _ = self.compute_per_example_loss(module, part)
            if per_example.shape != part_mask.shape:  # no broadcasting of one loss over several examples
                raise ValueError(
                    f"The per-example loss has shape {tuple(per_example.shape)} for {part_mask.shape[0]} examples; "
                    "DPTrainer needs one loss per example (row) of the micro-batch."
                )
            per_example = per_example * part_mask.to(per_example.dtype)
            norms = self.dp_engine.backward(per_example, part_mask)
            self._record_norms(norms, part_mask)
            loss_sum += per_example.detach().sum()
        if args.torch_empty_cache_steps is not None and self.state.global_step % args.torch_empty_cache_steps == 0:
            clear_device_cache()  # as the HF training_step does
        self._dp_micro_steps += 1
        if self.accelerator.sync_gradients:
            if self._dp_micro_steps != args.gradient_accumulation_steps:
                raise RuntimeError(
                    f"A logical step ended after {self._dp_micro_steps} micro-batches instead of "
                    f"gradient_accumulation_steps={args.gradient_accumulation_steps}; refusing an incomplete DP step."
                )
            self._finalize_logical_step()
        # sum of per-sequence losses / expected batch share of this process: the HF loop sums this over micro-steps
        # and averages over processes, giving (sum over the logical batch) / logical_batch_size.
        return loss_sum / (args.logical_batch_size / args.world_size)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Counts the tokens of the sampled sequences only (not the masked padding slots of truncated Poisson)."""
        mask = self._dp_last_mask
        if self.args.include_num_input_tokens_seen != "no" and mask is not None and not bool(mask.all()):
            rows = mask.to(torch.bool)
            inputs = {
                key: value[rows.to(value.device)]
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows.shape[0]
                else value
                for key, value in inputs.items()
            }
        super()._track_num_input_tokens(inputs)

    def _record_norms(self, norms: torch.Tensor, mask: torch.Tensor) -> None:
        """Accumulates (examples, sum of norms, clipped examples) on the device; synced only when logging."""
        with torch.no_grad():
            real = mask.to(torch.float64)
            norms64 = norms.detach().to(device=real.device, dtype=torch.float64)
            clipped = (norms64 > self.args.per_sample_max_grad_norm).to(torch.float64)
            update = torch.stack([real.sum(), (norms64 * real).sum(), (clipped * real).sum()])
            if self._dp_norm_stats is None or self._dp_norm_stats.device != update.device:
                self._dp_norm_stats = torch.zeros(3, dtype=torch.float64, device=update.device)
            self._dp_norm_stats += update

    def _finalize_logical_step(self) -> None:
        self.dp_engine.finalize_step(
            self.noise_multiplier, self.args.logical_batch_size, generator=self._dp_noise_generator
        )
        self.dp_engine.zero_accumulator()
        self.privacy_accountant.step()
        self._dp_micro_steps = 0
        self._dp_logged_steps += 1

    def _pop_dp_stats(self) -> dict[str, float]:
        steps, self._dp_logged_steps = self._dp_logged_steps, 0
        stats = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        if self._dp_norm_stats is not None:
            stats += self._dp_norm_stats.to(self.args.device)
            self._dp_norm_stats.zero_()
        if dist.is_available() and dist.is_initialized() and self.args.world_size > 1:
            dist.all_reduce(stats)
        examples, norm_sum, clipped = stats.tolist()
        if steps == 0:
            return {}
        out = {"dp_batch_size": examples / steps}
        if examples > 0:
            out["dp_mean_grad_norm"] = norm_sum / examples
            out["dp_clipped_fraction"] = clipped / examples
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``epsilon`` (and clipping statistics) to training logs."""
        if self.privacy_accountant is not None and ("loss" in logs or "train_loss" in logs):
            if "loss" in logs:
                logs.update(self._pop_dp_stats())
            logs["epsilon"] = self.get_epsilon()
        super().log(logs, start_time)


class DPCallback(TrainerCallback):
    """Stops training when the privacy budget is reached and shows ε in the progress bar."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        budget = trainer._dp_budget_steps
        accountant = trainer.privacy_accountant
        if budget is not None and accountant is not None and accountant.steps >= budget:
            if not control.should_training_stop:
                logger.warning(
                    "Privacy budget reached after %d steps (epsilon=%.4g, target %g at delta=%g): stopping training.",
                    accountant.steps,
                    trainer.get_epsilon(),
                    args.target_epsilon,
                    trainer.target_delta,
                )
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "epsilon" in logs and state.is_world_process_zero:
            for callback in self.trainer.callback_handler.callbacks:
                bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
                if bar is not None:
                    bar.set_postfix(epsilon=round_up(logs["epsilon"]), refresh=False)
        return control


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b

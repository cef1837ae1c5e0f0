"""Model-agnostic DP-SGD gradient engine: exact per-sample clipping of the whole trainable gradient, noise once.

The engine hooks every module that directly owns trainable parameters (see :mod:`vaultgemma_hf.dp.hooks`), so it
works on any ``nn.Module`` built from supported layers: our VaultGemma, transformers' built-in one, PEFT LoRA
models, partially frozen models. It knows no model class.

One logical DP-SGD step::

    engine = DPGradientEngine(model, max_grad_norm=C)
    for micro_batch in logical_batch:                     # gradient accumulation
        per_example_loss = loss_fn(model(**micro_batch))  # [B], forward with the hooks active
        engine.backward(per_example_loss, example_mask)   # clip each sample jointly over all params, sum
    engine.finalize_step(noise_multiplier=sigma, expected_batch_size=L)  # + N(0, sigma^2 C^2), / L -> p.grad
    optimizer.step(); optimizer.zero_grad()

While attached, every forward run with gradients enabled is recorded for the next :meth:`DPGradientEngine.backward`;
calling ``loss.backward()`` directly is an error. Gradient checkpointing and wrapping the model in
``DistributedDataParallel`` are not supported (the engine all-reduces the clipped sums itself).

The trainable set (``requires_grad``) is fixed when the engine is built: a parameter unfrozen later would get its raw,
unclipped gradient from autograd, one frozen later would still be updated. Both are refused with an error at the next
:meth:`DPGradientEngine.backward` / :meth:`DPGradientEngine.finalize_step`; set ``requires_grad`` before building the
engine (and the trainer), or detach the engine and build a new one after changing it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import grad_norms as gn
from .hooks import Call, Contribution, ModuleRule, UnsupportedModuleError, cross_term, make_rule
from .noise import add_gaussian_noise, os_seeded_generator

__all__ = ["DPGradientEngine", "UnsupportedModuleError"]

logger = logging.getLogger(__name__)


class _AttachToGraph(torch.autograd.Function):
    """Identity (a copy) that makes a module output part of the autograd graph when nothing upstream requires
    grad (e.g. a trainable embedding whose weight is switched off during its forward), so its gradient arrives."""

    @staticmethod
    def forward(ctx: Any, dummy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def _name_list(
    params: list[nn.Parameter],
    names: dict[int, str],
    limit: int = 20,
    describe: Callable[[nn.Parameter], str] | None = None,
) -> str:
    """The first `limit` parameters' names (each followed by `describe(p)` when given), and how many there are."""
    listed = ", ".join(names.get(id(p), "<unnamed>") + (describe(p) if describe else "") for p in params[:limit])
    return listed + (f" ... ({len(params)} in all)" if len(params) > limit else "")


def _in_autograd_backward() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class DPGradientEngine:
    """Per-sample clipped gradient sums and Gaussian noise for every trainable parameter of a model.

    Per-sample gradients of all trainable parameters are clipped *jointly* to L2 norm ``max_grad_norm`` (C):
    ``g_i * min(1, C / (||g_i|| + 1e-6))``; their sum over the logical batch is accumulated in float32, then
    :meth:`finalize_step` adds ``N(0, sigma^2 C^2)`` noise once and divides by the expected batch size into
    ``p.grad``. A parameter used by several modules (tied input embedding / LM head) gets the sum of its uses'
    per-sample gradients, cross terms included in the norm.

    Args:
        model: the model. Its parameters with ``requires_grad=True`` at construction are the trainable ones; this set
            must not change while the engine is attached (changes are refused with a ``RuntimeError``).
        max_grad_norm: clipping norm C (> 0).
        norm_dtype: dtype of norms and per-sample math (float32; wider inputs keep their precision).
        chunk_bytes: cap on temporary per-sample buffers; work is split over samples to stay under it.
        exact_scaling: under bf16/fp16 autocast, apply each clipping factor in float32 to the sample's exact
            float32 gradient (one matmul per sample and layer), so that every clipped contribution has norm <= C up
            to float32 rounding. ``False`` folds the factors into the bf16 output gradients (one matmul per layer,
            faster; contributions may exceed C by the bf16 rounding, ~2^-8 relative, as in Opacus under AMP).

    Raises:
        UnsupportedModuleError: a trainable parameter is owned by a module without a per-sample rule.
        ValueError: bad arguments, no trainable parameter, or gradient checkpointing enabled.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        *,
        norm_dtype: torch.dtype = torch.float32,
        chunk_bytes: int = gn.DEFAULT_CHUNK_BYTES,
        exact_scaling: bool = True,
    ) -> None:
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if not norm_dtype.is_floating_point or torch.finfo(norm_dtype).bits < 32:
            raise ValueError(f"norm_dtype must be float32 or float64, got {norm_dtype}")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(
                "Gradient checkpointing is enabled on the model; the DP engine does not support it "
                "(call model.gradient_checkpointing_disable())."
            )
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.norm_dtype = norm_dtype
        self.chunk_bytes = int(chunk_bytes)
        self.exact_scaling = bool(exact_scaling)
        self.trainable_parameters: list[tuple[str, nn.Parameter]] = [
            (name, p) for name, p in model.named_parameters() if p.requires_grad
        ]
        if not self.trainable_parameters:
            raise ValueError("The model has no trainable parameter (requires_grad=True).")
        self.num_accumulated = 0

        self._rules: list[ModuleRule] = []
        self._owners: dict[int, list[str]] = {}
        for module_name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise UnsupportedModuleError(
                    f"Module '{module_name}' ({type(module).__name__}) mixes samples through batch statistics, so "
                    "per-sample gradients are not separable and DP-SGD's guarantee does not hold (trainable or not). "
                    "Use GroupNorm/LayerNorm instead."
                )
            own = [(attr, p) for attr, p in module._parameters.items() if p is not None and p.requires_grad]
            if not own:
                continue
            self._rules.append(make_rule(self, module_name, module, own))
            for attr, p in own:
                self._owners.setdefault(id(p), []).append(f"{module_name}.{attr}" if module_name else attr)
        self._params: dict[int, nn.Parameter] = {id(p): p for _, p in self.trainable_parameters}
        missing = [name for name, p in self.trainable_parameters if id(p) not in self._owners]
        if missing:  # cannot happen with nn.Module bookkeeping, kept as a guard
            raise UnsupportedModuleError(f"Trainable parameters without an owning module: {missing}")
        # The trainable set as built, for a cheap per-micro-batch check (one attribute read per parameter).
        self._all_params: tuple[nn.Parameter, ...] = tuple(model.parameters())
        self._expected_requires_grad: list[bool] = [id(p) in self._params for p in self._all_params]

        self._handles: list[Any] = []
        self._attached = True
        self._suspend_depth = 0
        self._off_count: dict[int, int] = {}
        self._saved_requires_grad: dict[int, bool] = {}
        self._calls: list[Call] = []
        self._uses: dict[int, int] = {}
        self._cast_cache: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._inputs: dict[int, list[Any]] = {}  # id(A) -> [weakref(A), linear users left, Gram matrices or None]
        self._acc: dict[int, torch.Tensor] = {}
        self._pending: list[Contribution] = []
        self._in_backward = False
        self._batch = 0
        self._mask: torch.Tensor | None = None
        self._mask_all = True
        self._dummy = torch.zeros((), requires_grad=True)
        self._generators: dict[str, torch.Generator] = {}
        self._checked_first_backward = False

        for rule in self._rules:
            self._handles.append(rule.module.register_forward_pre_hook(self._pre_hook(rule)))
            self._handles.append(
                rule.module.register_forward_hook(self._post_hook(rule), with_kwargs=True, always_call=True)
            )
        for name, p in self.trainable_parameters:
            self._handles.append(p.register_hook(self._leaf_hook(name, p)))

    # ------------------------------------------------------------------------------------------------ hooks

    def _recording(self) -> bool:
        return self._attached and self._suspend_depth == 0 and torch.is_grad_enabled()

    @contextlib.contextmanager
    def _suspended(self) -> Iterator[None]:
        self._suspend_depth += 1
        try:
            yield
        finally:
            self._suspend_depth -= 1

    def _switch(self, rule: ModuleRule, off: bool) -> None:
        """Turns ``requires_grad`` off for the rule's parameters during its module's forward, then restores it.

        Off, autograd computes no summed weight gradient (the engine recomputes it per sample, clipped). Nested or
        shared uses (tied weights) are counted; the outermost restore puts back the state saved when switching off,
        so a parameter the user froze stays frozen (and is then refused by :meth:`_check_trainable_set`).
        """
        for _, p in rule.params:
            key = id(p)
            count = self._off_count.get(key, 0) + (1 if off else -1)
            self._off_count[key] = count
            if off and count == 1:
                self._saved_requires_grad[key] = p.requires_grad
                p.requires_grad_(False)
            elif not off and count == 0:
                p.requires_grad_(self._saved_requires_grad.pop(key, True))

    def _pre_hook(self, rule: ModuleRule):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self._recording():
                return
            if _in_autograd_backward():
                raise RuntimeError(
                    f"Module {rule.describe()} ran a forward inside backward (gradient checkpointing?); "
                    "the DP engine does not support recomputation."
                )
            rule.depth += 1
            if rule.depth == 1:
                self._switch(rule, off=True)

        return hook

    def _post_hook(self, rule: ModuleRule):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if rule.depth == 0:  # the pre-hook did not switch this forward off: not recorded
                return None
            rule.depth -= 1
            if rule.depth == 0:
                self._switch(rule, off=False)
            if output is None:  # forward raised (always_call): parameters restored, nothing to record
                return None
            call = rule.make_call(args, kwargs, output)
            for _, p in rule.params:
                self._uses[id(p)] = self._uses.get(id(p), 0) + 1
            self._calls.append(call)
            out = output if output.requires_grad else _AttachToGraph.apply(self._dummy, output)
            out.register_hook(lambda grad, call=call: self._on_grad(call, grad))
            return None if out is output else out

        return hook

    def _leaf_hook(self, name: str, param: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            owners = ", ".join(self._owners.get(id(param), []))
            raise UnsupportedModuleError(
                f"Trainable parameter '{name}' received a gradient outside the forward of its module(s) ({owners}), "
                "e.g. through a functional call on the parameter elsewhere in the model. The DP engine cannot "
                "compute its per-sample gradient; freeze it or route its use through its module."
            )

        return hook

    def _check_trainable_set(self) -> None:
        """Raises if a parameter's ``requires_grad`` differs from what it was when the engine was built.

        Cheap enough for every micro-batch: one ``requires_grad`` read per cached parameter and one list comparison;
        names are only looked up when something changed.

        Raises:
            RuntimeError: the trainable set changed (the message names the parameters and what to do).
        """
        if [p.requires_grad for p in self._all_params] == self._expected_requires_grad:
            return
        unfrozen, frozen = [], []
        for p, expected in zip(self._all_params, self._expected_requires_grad):
            if self._off_count.get(id(p), 0) > 0:  # switched off by the engine inside its module's forward
                continue
            if p.requires_grad and not expected:
                unfrozen.append(p)
            elif expected and not p.requires_grad:
                frozen.append(p)
        if not unfrozen and not frozen:
            return
        names = self._parameter_names()
        parts = []
        if unfrozen:
            parts.append(
                f"made trainable (requires_grad=True) after the engine was built, so autograd would hand their raw, "
                f"unclipped and un-noised gradient to the optimizer: {_name_list(unfrozen, names)}"
            )
        if frozen:
            parts.append(
                f"frozen (requires_grad=False) after the engine was built, which still clips, noises and writes "
                f"their gradient: {_name_list(frozen, names)}"
            )
        raise RuntimeError(
            "The trainable parameter set changed while the DPGradientEngine was attached; parameters "
            + "; parameters ".join(parts)
            + ". Set requires_grad on every parameter before building the DPTrainer / DPGradientEngine (the "
            "optimizer is built from the same set), or, to change it (e.g. gradual unfreezing), call "
            "engine.detach() and build a new engine (and optimizer) afterwards. Nothing was accumulated or applied."
        )

    def _check_stray_gradients(self) -> None:
        """Raises if a parameter of the model that the engine does not manage holds a gradient.

        Last line of defence before the optimizer step: such a gradient was computed by autograd outside the engine
        (a parameter unfrozen, replaced or added after the engine was built, or a plain ``backward()``), so it is
        neither clipped nor noised. Walks ``model.parameters()`` once per logical step, so new parameters are seen.

        Raises:
            RuntimeError: such gradients exist (the message names the parameters).
        """
        stray = [p for p in self.model.parameters() if p.grad is not None and id(p) not in self._params]
        if not stray:
            return
        listed = _name_list(stray, self._parameter_names(), describe=lambda p: f" (requires_grad={p.requires_grad})")
        raise RuntimeError(
            f"Parameter(s) not managed by the DPGradientEngine hold a gradient: {listed}. An optimizer step would "
            "apply it without per-sample clipping or noise, breaking the DP guarantee. It was computed outside the "
            "engine (a parameter made trainable, replaced or added after the engine was built, or a plain "
            "backward()). Set requires_grad and add all parameters before building the DPTrainer / "
            "DPGradientEngine (or detach it and build a new one), and clear stale gradients (p.grad = None, "
            "model.zero_grad()). No gradient was written for this step."
        )

    def _parameter_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.model.named_parameters()}

    def _use_count(self, param: nn.Parameter) -> int:
        return self._uses.get(id(param), 0)

    def _matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor a matmul actually consumes under autocast (cast once per forward even if shared)."""
        device_type = x.device.type
        if not (torch.is_autocast_enabled(device_type) and x.is_floating_point() and x.dtype != torch.float64):
            return x
        target = torch.get_autocast_dtype(device_type)
        if x.dtype == target:
            return x
        key = id(x)
        hit = self._cast_cache.get(key)
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        cast = x.detach().to(target)
        self._cast_cache[key] = (weakref.ref(x), x._version, cast)
        return cast

    def _register_input(self, A: torch.Tensor) -> None:
        """Counts the linear layers reading the same input tensor (q/k/v, gate/up) to share its Gram matrices."""
        entry = self._inputs.get(id(A))
        if entry is not None and entry[0]() is A:
            entry[1] += 1
        else:
            self._inputs[id(A)] = [weakref.ref(A), 1, None]

    def _shared_input_gram(self, A: torch.Tensor, flat: torch.Tensor) -> torch.Tensor | None:
        """``A A^T`` per sample, computed once for all linear layers reading ``A`` (None if ``A`` is not shared)."""
        entry = self._inputs.get(id(A))
        if entry is None or entry[0]() is not A or entry[1] < 2 and entry[2] is None:
            return None
        if entry[2] is None:
            if 4 * flat.shape[0] * flat.shape[1] ** 2 > self.chunk_bytes:
                return None
            entry[2] = gn.gram(flat, self.norm_dtype)
        return entry[2]

    def _release_input(self, A: torch.Tensor) -> None:
        entry = self._inputs.get(id(A))
        if entry is not None and entry[0]() is A:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._inputs[id(A)]

    @staticmethod
    def _bytes_cost(device: torch.device) -> float:
        """Multiply-adds one byte of memory traffic is worth when choosing per-layer algorithms."""
        return 100.0 if device.type == "cuda" else 2.0

    def _on_grad(self, call: Call, grad: torch.Tensor) -> None:
        if not self._in_backward:
            raise RuntimeError(
                f"A gradient reached module {call.rule.describe()} outside DPGradientEngine.backward(); with the DP "
                "engine attached, call engine.backward(per_example_loss) instead of loss.backward()."
            )
        if grad.dim() == 0 or grad.shape[0] != self._batch:
            raise UnsupportedModuleError(
                f"The output of module {call.rule.describe()} has leading dimension "
                f"{tuple(grad.shape)[:1]} but the batch has {self._batch} samples; the DP engine needs every hooked "
                "module to keep the sample dimension first (no flattening of samples and tokens together)."
            )
        with torch.no_grad():
            if not self._mask_all:  # padded rows contribute nothing, even if their loss produced NaN gradients
                assert self._mask is not None
                mask = self._mask.to(grad.device).view(-1, *([1] * (grad.dim() - 1)))
                grad = torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
            self._pending.extend(call.contributions(grad))

    # ---------------------------------------------------------------------------------------------- public

    def backward(self, per_example_loss: torch.Tensor, example_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Backpropagates a micro-batch and adds its per-sample clipped gradients to the accumulators.

        Args:
            per_example_loss: ``[B]`` loss of each sample (mean token loss over its labelled tokens), from one
                forward of the micro-batch done while the engine is attached. It must be finite for real samples.
            example_mask: optional ``[B]`` bool; ``False`` rows are padding and contribute nothing.

        Returns:
            ``[B]`` per-sample gradient norms over all trainable parameters before clipping (float32; float64 for
            float64 parameters or ``norm_dtype``; 0 for masked rows).

        Raises:
            ValueError: bad shapes, or a non-finite per-sample gradient norm.
            UnsupportedModuleError: a parameter got gradient through a path the hooks cannot see, or a module
                does not keep the sample dimension first.
            RuntimeError: the trainable parameter set changed since the engine was built (checked before autograd
                runs, so no unclipped gradient reaches ``p.grad``).
        """
        self._check_attached()
        if not isinstance(per_example_loss, torch.Tensor) or per_example_loss.dim() != 1:
            raise ValueError(
                "per_example_loss must be a 1-D tensor [batch] of per-sample losses, got "
                f"{getattr(per_example_loss, 'shape', type(per_example_loss))}"
            )
        batch = per_example_loss.shape[0]
        device = per_example_loss.device
        if example_mask is None:
            mask = torch.ones(batch, dtype=torch.bool, device=device)
        else:
            if example_mask.shape != (batch,):
                raise ValueError(f"example_mask must have shape ({batch},), got {tuple(example_mask.shape)}")
            mask = example_mask.to(device=device, dtype=torch.bool)
        n_real = int(mask.sum().item())

        self._batch, self._mask, self._mask_all = batch, mask, n_real == batch
        self._pending = []
        try:
            self._check_trainable_set()
            if n_real > 0 and per_example_loss.requires_grad:
                self._in_backward = True
                torch.autograd.backward(per_example_loss, grad_tensors=mask.to(per_example_loss.dtype))
            contributions, self._pending = self._pending, []
        finally:
            self._in_backward = False
            self._calls = []
            self._uses = {}
            self._cast_cache = {}
            self._inputs = {}
            self._mask = None
            self._pending = []

        with torch.no_grad():
            norms = self._clip_and_accumulate(contributions, mask, device)
        self.num_accumulated += n_real
        return norms

    def _clip_and_accumulate(
        self, contributions: list[Contribution], mask: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        batch = mask.shape[0]
        by_param: dict[int, list[Contribution]] = {}
        for c in contributions:
            by_param.setdefault(id(c.param), []).append(c)
        del contributions
        if not self._checked_first_backward and by_param:
            self._checked_first_backward = True
            unused = [name for name, p in self.trainable_parameters if id(p) not in by_param]
            if unused:
                logger.warning(
                    "%d trainable parameter(s) got no gradient in the first DP backward (unused in the forward?); "
                    "they receive only noise: %s",
                    len(unused),
                    ", ".join(unused[:20]) + (" ..." if len(unused) > 20 else ""),
                )
        sq_dtype = self.norm_dtype  # float64 contributions (float64 models) keep their precision in the norms
        for uses in by_param.values():
            for c in uses:
                sq_dtype = torch.promote_types(sq_dtype, c.sq_norms.dtype)
        sq = torch.zeros(batch, dtype=sq_dtype, device=device)
        for uses in by_param.values():
            for i, c in enumerate(uses):
                sq += c.sq_norms.to(device=device, dtype=sq.dtype)
                for other in uses[i + 1 :]:
                    sq += 2 * cross_term(c, other).to(device=device, dtype=sq.dtype)
        norms = torch.where(mask, sq.clamp_min(0).sqrt(), torch.zeros((), dtype=sq.dtype, device=device))
        if not bool(torch.isfinite(norms).all()):
            bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
            raise ValueError(
                f"Non-finite per-sample gradient norm for sample(s) {bad} of the micro-batch; nothing was "
                "accumulated. Check the per-example loss (e.g. division by zero labelled tokens). If the gradients "
                f"are finite but huge (a norm above ~{math.sqrt(torch.finfo(sq.dtype).max):.1e} overflows when "
                f"squared in {sq.dtype}), build the engine with norm_dtype=torch.float64."
            )
        factors = gn.clip_factors(norms, self.max_grad_norm) * mask.to(norms.dtype)
        factors_host = factors.tolist()
        for key in list(by_param):
            uses = by_param.pop(key)
            param = self._params.get(key, uses[0].param)
            acc = self._acc.get(key)
            if acc is None:
                acc = torch.zeros(param.shape, dtype=self._acc_dtype(param), device=param.device)
            for c in uses:
                acc = c.add_clipped(acc, factors.to(acc.device), factors_host)
            self._acc[key] = acc
        return norms.to(torch.promote_types(norms.dtype, torch.float32))

    @staticmethod
    def _acc_dtype(param: nn.Parameter) -> torch.dtype:
        return torch.promote_types(param.dtype, torch.float32)

    def finalize_step(
        self, noise_multiplier: float, expected_batch_size: float, *, generator: torch.Generator | None = None
    ) -> None:
        """Adds the noise once, averages, writes ``p.grad`` for every trainable parameter, resets the accumulators.

        ``p.grad = (sum_i clip(g_i) + N(0, sigma^2 C^2)) / expected_batch_size`` (cast to the parameter's dtype),
        with the noise drawn in float32. Under ``torch.distributed`` the clipped sums are all-reduced (SUM) and
        the noise is added on rank 0 only, before the reduce, so it is added exactly once. Every trainable
        parameter gets noise, also when no sample was accumulated (empty Poisson batch).

        Args:
            noise_multiplier: sigma (>= 0; 0 only for non-private controls).
            expected_batch_size: the expected number of samples per logical step (> 0), not the realised one.
            generator: random generator for the noise; default: one per device seeded from OS entropy.

        Raises:
            ValueError: bad ``noise_multiplier`` or ``expected_batch_size``.
            RuntimeError: the trainable parameter set changed since the engine was built, or a parameter the engine
                does not manage holds a gradient (it would be applied unclipped); nothing is written then.
        """
        self._check_attached()
        self._check_trainable_set()
        self._check_stray_gradients()
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        accs: list[tuple[nn.Parameter, torch.Tensor]] = []
        for _, p in self.trainable_parameters:
            acc = self._acc.pop(id(p), None)
            if acc is None:
                acc = torch.zeros(p.shape, dtype=self._acc_dtype(p), device=p.device)
            accs.append((p, acc))
        self._acc = {}
        std = noise_multiplier * self.max_grad_norm
        distributed = dist.is_available() and dist.is_initialized()
        if std > 0 and generator is None:
            generator = self._default_generator(accs[0][1].device)
        with torch.no_grad():
            if distributed:  # noise on rank 0 only, before the sum, so that it is added exactly once
                if std > 0 and dist.get_rank() == 0:
                    accs = [(p, add_gaussian_noise(acc, std, generator)) for p, acc in accs]
                for _, acc in accs:
                    dist.all_reduce(acc, op=dist.ReduceOp.SUM)
                for _, acc in accs:
                    acc.div_(expected_batch_size)
            else:  # (sum + N(0, std^2)) / L drawn as N(sum / L, (std / L)^2): two passes over the accumulator
                accs = [
                    (p, add_gaussian_noise(acc.div_(expected_batch_size), std / expected_batch_size, generator))
                    for p, acc in accs
                ]
            for p, acc in accs:
                p.grad = acc if acc.dtype == p.dtype else acc.to(p.dtype)
        self.num_accumulated = 0

    def _default_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = os_seeded_generator(device)
        return self._generators[key]

    def zero_accumulator(self) -> None:
        """Discards the accumulated clipped sums (and any recorded forward not yet backpropagated)."""
        self._acc = {}
        self._calls = []
        self._uses = {}
        self._cast_cache = {}
        self._inputs = {}
        self.num_accumulated = 0

    def detach(self) -> None:
        """Removes all hooks; the model behaves as before (parameters keep their ``requires_grad``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for key, count in self._off_count.items():
            if count > 0 and key in self._params:
                self._params[key].requires_grad_(self._saved_requires_grad.get(key, True))
        self._off_count = {}
        self._saved_requires_grad = {}
        self.zero_accumulator()
        self._attached = False

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("This DPGradientEngine was detached from its model.")

    def describe(self) -> list[dict[str, Any]]:
        """The per-module rules (module path, type, rule kind, parameters) for logging."""
        return [
            {
                "module": rule.name,
                "type": type(rule.module).__name__,
                "rule": rule.kind,
                "params": [attr for attr, _ in rule.params],
            }
            for rule in self._rules
        ]

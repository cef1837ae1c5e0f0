"""Module rules: what the DP engine records in each module's forward and computes when its output gradient arrives.

A *rule* is attached to every module that directly owns trainable parameters. In the module's forward it

* turns ``requires_grad`` off for the module's own trainable parameters for the duration of the forward, so autograd
  never computes the summed weight gradients that the engine recomputes (clipped) anyway;
* records what the per-sample rule needs (the input activations, the token ids, ...) in a :class:`Call`;
* hooks the output tensor so that its gradient ``G`` (one row per sample) reaches the call during backward.

When ``G`` arrives the call turns it into :class:`Contribution` objects, one per (call, parameter): each knows the
per-sample squared norms of its part of the gradient, its inner products with other uses of the same parameter
(tied weights), and how to add its clipped sum to an accumulator once the clipping factors are known. The math lives
in :mod:`vaultgemma_hf.dp.grad_norms`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import grad_norms as gn

if TYPE_CHECKING:
    from .engine import DPGradientEngine

__all__ = [
    "Contribution",
    "EmbeddingContribution",
    "EmbeddingRule",
    "GenericRule",
    "LinearRule",
    "LinearWeightContribution",
    "MaterializedContribution",
    "ModuleRule",
    "UnsupportedModuleError",
    "cross_term",
    "make_rule",
]


class UnsupportedModuleError(ValueError):
    """A trainable parameter whose per-sample gradient the DP engine cannot compute exactly.

    The message names the module path and its type (and the parameter where relevant).
    """


def _describe(name: str, module: nn.Module) -> str:
    return f"'{name or '<root>'}' ({type(module).__module__}.{type(module).__qualname__})"


def _check_unmodified(rule: ModuleRule, recorded: list[tuple[torch.Tensor, int]]) -> None:
    """Raises if a tensor recorded in a module's forward was modified in place before its gradient arrived.

    With the module's parameters switched off during its forward, autograd does not save the module's inputs for a
    weight gradient, so its usual "modified by an inplace operation" error cannot fire; the engine, which reads the
    recorded inputs in backward, checks their version counters instead (one integer comparison per tensor).

    Raises:
        UnsupportedModuleError: a recorded input changed (the message names the module).
    """
    for tensor, version in recorded:
        if tensor._version != version:
            raise UnsupportedModuleError(
                f"An input of module {rule.describe()} was modified in place after the module's forward (tensor "
                f"version {version} -> {tensor._version}), before its gradient was computed; the DP engine reads "
                "the recorded inputs in backward and would compute a wrong per-sample gradient. Avoid the in-place "
                "operation on the module's input (e.g. x = x * s instead of x.mul_(s))."
            )


# ----------------------------------------------------------------------------------------------- contributions


class Contribution:
    """One use's share of one parameter's per-sample gradients.

    Attributes:
        param: the parameter.
        batch: number of samples ``B``.
        sq_norms: ``[B]`` squared norms of this use's per-sample gradients (float32 or wider).
    """

    param: nn.Parameter
    batch: int
    sq_norms: torch.Tensor

    def add_clipped(self, acc: torch.Tensor, factors: torch.Tensor, factors_host: list[float]) -> torch.Tensor:
        """Returns ``acc + sum_i factors_i g_i`` (may update ``acc`` in place and return it)."""
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:
        """Dense per-sample gradients ``[B, *param.shape]``."""
        raise NotImplementedError


class MaterializedContribution(Contribution):
    """Per-sample gradients held densely (biases, generic modules, small linear layers)."""

    def __init__(self, param: nn.Parameter, grads: torch.Tensor) -> None:
        self.param = param
        self.grads = grads
        self.batch = grads.shape[0]
        self.sq_norms = gn.materialized_sq_norms(grads)

    def add_clipped(self, acc: torch.Tensor, factors: torch.Tensor, factors_host: list[float]) -> torch.Tensor:
        return acc.add_(torch.tensordot(factors.to(acc.dtype), self.grads.to(acc.dtype), dims=1))

    def materialize(self) -> torch.Tensor:
        return self.grads


class LinearWeightContribution(Contribution):
    """A linear layer's weight: activations ``A`` and output gradients ``G``, and/or its materialised gradients.

    Args:
        param: the weight.
        A: ``[B, T, in]`` inputs (as consumed by the matmul, e.g. bf16 under autocast).
        G: ``[B, T, out]`` output gradients.
        plan: from :func:`~vaultgemma_hf.dp.grad_norms.choose_linear_plan`.
        shared: the weight has other uses in this forward (keep what cross terms need).
        dtype: norm dtype.
        chunk_bytes: cap on temporary buffers.
        exact_scaling: see :func:`~vaultgemma_hf.dp.grad_norms.linear_clipped_sum`.
        gram_a: ``A A^T`` per sample if already computed for another layer with the same input.
    """

    def __init__(
        self,
        param: nn.Parameter,
        A: torch.Tensor,
        G: torch.Tensor,
        plan: gn.LinearPlan,
        *,
        shared: bool,
        dtype: torch.dtype,
        chunk_bytes: int,
        exact_scaling: bool = True,
        gram_a: torch.Tensor | None = None,
    ) -> None:
        self.param = param
        self.batch = A.shape[0]
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.exact_scaling = exact_scaling
        self.plan = plan
        self.A: torch.Tensor | None = A
        self.G: torch.Tensor | None = G
        self.grads: torch.Tensor | None = None
        if plan.keep_per_sample:
            self.grads = gn.linear_weight_per_sample_grads(A, G, dtype)
            self.sq_norms = gn.materialized_sq_norms(self.grads)
            if not shared:  # the per-sample gradients are all we need: let A and G go
                self.A = self.G = None
        elif plan.norm == "materialize":
            self.sq_norms = gn.linear_sq_norms_materialized(A, G, dtype, chunk_bytes)
        else:
            self.sq_norms = gn.linear_sq_norms_ghost(A, G, dtype, chunk_bytes, gram_a=gram_a)

    def add_clipped(self, acc: torch.Tensor, factors: torch.Tensor, factors_host: list[float]) -> torch.Tensor:
        if self.grads is not None:
            return acc.add_(torch.tensordot(factors.to(acc.dtype), self.grads.to(acc.dtype), dims=1))
        assert self.A is not None and self.G is not None
        return gn.linear_clipped_sum(acc, self.A, self.G, factors, factors_host, self.exact_scaling)

    def materialize(self) -> torch.Tensor:
        if self.grads is None:
            assert self.A is not None and self.G is not None
            self.grads = gn.linear_weight_per_sample_grads(self.A, self.G, self.dtype)
        return self.grads


class EmbeddingContribution(Contribution):
    """An embedding table: token ids, output gradients and the embedding scale."""

    def __init__(
        self,
        param: nn.Parameter,
        ids: torch.Tensor,
        G: torch.Tensor,
        scale: float,
        padding_idx: int | None,
        *,
        dtype: torch.dtype,
    ) -> None:
        self.param = param
        self.batch = ids.shape[0]
        self.ids = ids
        self.G = G
        self.scale = scale
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.num_embeddings = param.shape[0]
        self.sq_norms = gn.embedding_sq_norms(ids, G, scale, padding_idx, self.num_embeddings, dtype)

    def add_clipped(self, acc: torch.Tensor, factors: torch.Tensor, factors_host: list[float]) -> torch.Tensor:
        gn.embedding_clipped_sum_(acc, self.ids, self.G, self.scale, self.padding_idx, factors)
        return acc

    def materialize(self) -> torch.Tensor:
        return gn.embedding_per_sample_grads(
            self.ids, self.G, self.scale, self.padding_idx, self.num_embeddings, self.dtype
        )


def cross_term(c1: Contribution, c2: Contribution) -> torch.Tensor:
    """Per-sample ``<g1_i, g2_i>`` between two uses of one parameter, without dense ``V x D`` buffers if possible."""
    if isinstance(c2, EmbeddingContribution) and not isinstance(c1, EmbeddingContribution):
        c1, c2 = c2, c1
    if isinstance(c1, EmbeddingContribution):
        if isinstance(c2, EmbeddingContribution):
            return gn.embedding_cross(
                c1.ids, c1.G, c1.scale, c1.padding_idx, c2.ids, c2.G, c2.scale, c2.padding_idx, c1.dtype
            )
        if isinstance(c2, LinearWeightContribution) and c2.A is not None:
            assert c2.G is not None
            return gn.embedding_linear_cross(
                c1.ids, c1.G, c1.scale, c1.padding_idx, c2.A, c2.G, c1.dtype, c2.chunk_bytes
            )
        return gn.embedding_materialized_cross(c1.ids, c1.G, c1.scale, c1.padding_idx, c2.materialize(), c1.dtype)
    if (
        isinstance(c1, LinearWeightContribution)
        and isinstance(c2, LinearWeightContribution)
        and c1.A is not None
        and c2.A is not None
    ):
        assert c1.G is not None and c2.G is not None
        return gn.linear_cross_ghost(c1.A, c1.G, c2.A, c2.G, c1.dtype, c1.chunk_bytes)
    return gn.materialized_cross(c1.materialize(), c2.materialize())


# ------------------------------------------------------------------------------------------------------ calls


class Call:
    """One forward call of a hooked module, waiting for its output gradient."""

    def __init__(self, rule: ModuleRule) -> None:
        self.rule = rule

    def contributions(self, G: torch.Tensor) -> list[Contribution]:
        """Turns the output gradient (already masked) into contributions and drops what is no longer needed."""
        raise NotImplementedError


class _LinearCall(Call):
    def __init__(self, rule: LinearRule, A: torch.Tensor | None) -> None:
        super().__init__(rule)
        self.A = A  # None when only the bias is trainable
        self.version = A._version if A is not None else 0

    def contributions(self, G: torch.Tensor) -> list[Contribution]:
        rule, engine = self.rule, self.rule.engine
        original, self.A = self.A, None
        if original is not None:
            _check_unmodified(rule, [(original, self.version)])
        G = gn.flatten_tokens(G)
        out: list[Contribution] = []
        for attr, param in rule.params:
            if attr == "weight":
                assert original is not None
                A = gn.flatten_tokens(original)
                plan = gn.choose_linear_plan(
                    A.shape[0],
                    A.shape[1],
                    A.shape[2],
                    G.shape[2],
                    activation_bytes=A.element_size(),
                    chunk_bytes=engine.chunk_bytes,
                    bytes_cost=engine._bytes_cost(A.device),
                )
                gram_a = engine._shared_input_gram(original, A) if plan.norm == "ghost" else None
                engine._release_input(original)
                out.append(
                    LinearWeightContribution(
                        param,
                        A,
                        G,
                        plan,
                        shared=engine._use_count(param) > 1,
                        dtype=engine.norm_dtype,
                        chunk_bytes=engine.chunk_bytes,
                        exact_scaling=engine.exact_scaling,
                        gram_a=gram_a,
                    )
                )
            else:
                out.append(MaterializedContribution(param, gn.linear_bias_per_sample_grads(G, engine.norm_dtype)))
        return out


class _EmbeddingCall(Call):
    def __init__(self, rule: EmbeddingRule, ids: torch.Tensor) -> None:
        super().__init__(rule)
        self.ids = ids
        self.version = ids._version

    def contributions(self, G: torch.Tensor) -> list[Contribution]:
        rule = self.rule
        assert isinstance(rule, EmbeddingRule)
        _check_unmodified(rule, [(self.ids, self.version)])
        (_, param) = rule.params[0]
        contribution = EmbeddingContribution(
            param, self.ids, G, rule.scale, rule.module.padding_idx, dtype=rule.engine.norm_dtype
        )
        return [contribution]


class _GenericCall(Call):
    def __init__(
        self,
        rule: GenericRule,
        args: tuple,
        kwargs: dict,
        autocast: tuple[str, bool, torch.dtype],
        modes: tuple[bool, ...],
    ) -> None:
        super().__init__(rule)
        self.args = args
        self.kwargs = kwargs
        self.autocast = autocast
        self.modes = modes  # the training flags of the module and its submodules during the forward
        flat = (
            args if not kwargs and all(isinstance(x, torch.Tensor) for x in args) else tree_flatten((args, kwargs))[0]
        )
        self.versions = [(x, x._version) for x in flat if isinstance(x, torch.Tensor)]

    def contributions(self, G: torch.Tensor) -> list[Contribution]:
        rule = self.rule
        assert isinstance(rule, GenericRule)
        _check_unmodified(rule, self.versions)
        self.versions = []
        grads = rule.per_sample_grads(self.args, self.kwargs, G, self.autocast, self.modes)
        self.args, self.kwargs = (), {}
        return [
            MaterializedContribution(param, grads[attr].to(gn._promote(grads[attr].dtype, rule.engine.norm_dtype)))
            for attr, param in rule.params
        ]


# ------------------------------------------------------------------------------------------------------ rules


class ModuleRule:
    """Hooks and per-sample rule for one module that directly owns trainable parameters.

    Args:
        engine: the owning engine.
        name: the module's path in the model.
        module: the module.
        params: its directly owned trainable parameters as ``(attribute, parameter)``.
    """

    kind = "module"

    def __init__(
        self, engine: DPGradientEngine, name: str, module: nn.Module, params: list[tuple[str, nn.Parameter]]
    ) -> None:
        self.engine = engine
        self.name = name
        self.module = module
        self.params = params
        self.verified = False
        self.depth = 0  # nested forwards of this module in flight with its parameters switched off

    def describe(self) -> str:
        return _describe(self.name, self.module)

    def make_call(self, args: tuple, kwargs: dict, output: Any) -> Call:
        raise NotImplementedError


class LinearRule(ModuleRule):
    """``nn.Linear`` (and subclasses computing ``F.linear(x, weight, bias)``, checked at the first call)."""

    kind = "linear"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verified = type(self.module).forward is nn.Linear.forward

    def make_call(self, args: tuple, kwargs: dict, output: Any) -> Call:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise UnsupportedModuleError(f"Linear module {self.describe()} was called without a tensor input/output.")
        if not self.verified:
            with torch.no_grad():
                ref = F.linear(x, self.module.weight, self.module.bias)
                ok = ref.shape == output.shape and torch.allclose(ref.float(), output.float(), rtol=1e-3, atol=1e-5)
            if not ok:
                raise UnsupportedModuleError(
                    f"Module {self.describe()} is an nn.Linear subclass whose forward is not "
                    "F.linear(input, weight, bias); the DP engine has no per-sample rule for it."
                )
            self.verified = True
        if "weight" not in dict(self.params):  # bias only: its per-sample gradient needs G alone
            return _LinearCall(self, None)
        A = self.engine._matmul_input(x)
        self.engine._register_input(A)
        return _LinearCall(self, A)


class EmbeddingRule(ModuleRule):
    """``nn.Embedding`` and subclasses whose forward is ``F.embedding(ids, weight) * embed_scale``.

    Gemma-family "scaled word embeddings" keep the scale in an ``embed_scale`` buffer or attribute; any subclass
    that overrides ``forward`` is checked numerically at its first call against that formula (scale 1 when there is
    no ``embed_scale``) and refused if it does something else.
    """

    kind = "embedding"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        module = self.module
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModuleError(
                f"Embedding {self.describe()} uses max_norm, scale_grad_by_freq or sparse gradients, which the DP "
                "engine does not support for a trainable table; freeze it or use a plain embedding."
            )
        self.plain = type(module).forward is nn.Embedding.forward
        self.verified = self.plain
        self.scale = 1.0
        self.scale_dtype = module.weight.dtype

    def _scale_now(self) -> float:
        module = self.module
        scale = getattr(module, "embed_scale", None)
        if scale is None:
            return 1.0
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise UnsupportedModuleError(f"Embedding {self.describe()} has a non-scalar embed_scale.")
            return float(scale.detach().to(module.weight.dtype).float().item())
        return float(torch.tensor(float(scale), dtype=module.weight.dtype).float().item())

    def make_call(self, args: tuple, kwargs: dict, output: Any) -> Call:
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or not isinstance(output, torch.Tensor):
            raise UnsupportedModuleError(f"Embedding {self.describe()} was not called with integer ids.")
        if not self.plain and self.scale_dtype != self.module.weight.dtype:  # scale is rounded to the weight dtype
            self.verified = False
        if not self.verified:
            self.scale = self._scale_now()
            self.scale_dtype = self.module.weight.dtype
            module = self.module
            with torch.no_grad():
                ref = F.embedding(ids, module.weight, module.padding_idx) * self.scale
                ok = ref.shape == output.shape and torch.allclose(ref.float(), output.float(), rtol=1e-3, atol=1e-6)
            if not ok:
                raise UnsupportedModuleError(
                    f"Module {self.describe()} is an nn.Embedding subclass whose forward is not "
                    "F.embedding(ids, weight) * embed_scale; the DP engine has no per-sample rule for it."
                )
            self.verified = True
        return _EmbeddingCall(self, ids)


class GenericRule(ModuleRule):
    """Any other module whose own trainable parameters are vectors or scalars (norm weights, biases, gates).

    Per-sample gradients of the module's own parameters come from recomputing the module's forward from the inputs
    recorded in the forward (under the same autocast state), with ``torch.func``: ``vmap`` over the samples of
    ``vjp(functional_call(module, params, input_i))`` applied to the sample's output gradient. This covers e.g.
    RMSNorm with ``x_normed * (1 + weight)`` without knowing the class. The module must return one tensor and be
    deterministic (no dropout inside).

    Fast path: most such parameters only broadcast against the activations (``x * (1 + weight)``, ``x + bias``).
    Then one batched recomputation with each parameter replaced by per-sample copies of shape
    ``[B, 1, ..., 1, *p.shape]`` gives all per-sample gradients at once (``autograd.grad`` with respect to the
    copies), without ``vmap``'s per-call overhead. It is used only after it reproduced a non-zero ``vmap`` result
    (checked once per train/eval state of the module); otherwise ``vmap`` is used for good. The recomputation runs
    in the train/eval state of the recorded forward; a module drawing random numbers (dropout) in its own forward
    is refused by ``vmap`` with an error naming it.
    """

    kind = "generic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._submodules: tuple[nn.Module, ...] = tuple(self.module.modules())
        # Whether the batched fast path reproduced vmap, per train/eval state of the module and its submodules (a
        # module may be deterministic in eval mode and use dropout in train mode); missing until checked.
        self._fast: dict[tuple[bool, ...], bool] = {}

    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self._submodules)

    @property
    def fast(self) -> bool | None:
        """Whether the fast path is used in the current train/eval state (None: not checked yet)."""
        return self._fast.get(self._modes())

    @contextlib.contextmanager
    def _in_modes(self, modes: tuple[bool, ...]) -> Iterator[None]:
        """Puts the module and its submodules in the train/eval state they had during the recorded forward."""
        now = self._modes()
        if now == modes:
            yield
            return
        for m, flag in zip(self._submodules, modes):
            m.training = flag
        try:
            yield
        finally:
            for m, flag in zip(self._submodules, now):
                m.training = flag

    def make_call(self, args: tuple, kwargs: dict, output: Any) -> Call:
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModuleError(
                f"Module {self.describe()} owns trainable parameters but returns {type(output).__name__}, not a "
                "tensor; the generic per-sample rule needs a single tensor output."
            )
        device_type = output.device.type
        autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        return _GenericCall(self, args, kwargs, autocast, self._modes())

    def per_sample_grads(
        self,
        args: tuple,
        kwargs: dict,
        G: torch.Tensor,
        autocast: tuple[str, bool, torch.dtype],
        modes: tuple[bool, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients ``{attribute: [B, *p.shape]}`` of the module's own trainable parameters.

        Args:
            args: the recorded positional inputs.
            kwargs: the recorded keyword inputs.
            G: ``[B, ...]`` output gradient.
            autocast: ``(device_type, enabled, dtype)`` during the recorded forward.
            modes: train/eval flags of the module and its submodules during the recorded forward (default: now).
                The recomputation runs in that state, and the fast path is validated separately for each state.
        """
        device_type, enabled, dtype = autocast
        modes = self._modes() if modes is None else modes
        try:
            with (
                self.engine._suspended(),
                self._in_modes(modes),
                torch.enable_grad(),
                torch.autocast(device_type, dtype, enabled=enabled),
            ):
                fast = self._fast.get(modes)
                if fast:
                    return self._expanded(args, kwargs, G)
                reference = self._vmapped(args, kwargs, G)
                if fast is None:
                    checked = self._check_expanded(args, kwargs, G, reference)
                    if checked is not None:
                        self._fast[modes] = checked
                return reference
        except UnsupportedModuleError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the module named
            hint = (
                " The module draws random numbers (dropout?) in its forward, which cannot be replayed per sample: "
                "disable it (p=0 / eval mode) or freeze the module's own parameters."
                if "random" in str(err)
                else ""
            )
            raise UnsupportedModuleError(
                f"The generic per-sample rule (torch.func vmap/vjp of the module's forward) failed for module "
                f"{self.describe()}: {type(err).__name__}: {err}.{hint}"
            ) from err

    def _check_expanded(
        self, args: tuple, kwargs: dict, G: torch.Tensor, reference: dict[str, torch.Tensor]
    ) -> bool | None:
        """Whether the fast path reproduces the vmap ``reference``; None (undecided) if the reference is all zero.

        An all-zero reference (e.g. a zero-initialised gate upstream, or a loss that ignores the module at the first
        step) would be matched by a fast path that is wrong in general (a parameter reduced over the batch copies).
        """
        if all(not bool(ref.any()) for ref in reference.values()):
            return None
        try:
            fast = self._expanded(args, kwargs, G)
        except Exception:  # noqa: BLE001 - the parameter does not simply broadcast: keep vmap
            return False
        for attr, ref in reference.items():
            got = fast.get(attr)
            if got is None or got.shape != ref.shape:
                return False
            ref32, got32 = ref.float(), got.float()
            scale = ref32.abs().max().clamp_min(1e-30)
            if not torch.allclose(got32, ref32, rtol=1e-4, atol=1e-5 * float(scale)):
                return False
        return True

    def _expanded(self, args: tuple, kwargs: dict, G: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = G.shape[0]
        copies = {}
        for attr, p in self.params:
            lead = G.dim() - 1 - p.dim()
            if lead < 0:
                raise ValueError("parameter has more dimensions than the output")
            shape = (batch,) + (1,) * lead + tuple(p.shape)
            copies[attr] = p.detach().reshape((1,) * (lead + 1) + tuple(p.shape)).expand(shape).clone()
            copies[attr].requires_grad_(True)
        flat, spec = tree_flatten((args, kwargs))
        flat = [x.detach() if isinstance(x, torch.Tensor) else x for x in flat]
        s_args, s_kwargs = tree_unflatten(flat, spec)
        out = torch.func.functional_call(self.module, copies, tuple(s_args), s_kwargs)
        if out.shape != G.shape:
            raise ValueError("output shape changed")
        grads = torch.autograd.grad(out, list(copies.values()), G.to(out.dtype), allow_unused=True)
        result = {}
        for (attr, p), g in zip(self.params, grads):
            if g is None:
                g = torch.zeros((batch,) + tuple(p.shape), dtype=p.dtype, device=p.device)
            result[attr] = g.reshape((batch,) + tuple(p.shape))
        return result

    def _vmapped(self, args: tuple, kwargs: dict, G: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = G.shape[0]
        flat, spec = tree_flatten((args, kwargs))
        batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch for x in flat]
        flat = [x.detach() if isinstance(x, torch.Tensor) else x for x in flat]
        params = {attr: p.detach() for attr, p in self.params}
        module = self.module

        def one_sample(sample_inputs: list[torch.Tensor], g: torch.Tensor) -> dict[str, torch.Tensor]:
            it = iter(sample_inputs)
            full = [next(it).unsqueeze(0) if b else x for x, b in zip(flat, batched)]
            s_args, s_kwargs = tree_unflatten(full, spec)

            def fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.functional_call(module, p, tuple(s_args), s_kwargs)

            out, vjp_fn = torch.func.vjp(fn, params)
            return vjp_fn(g.unsqueeze(0).to(out.dtype))[0]

        inputs = [x for x, b in zip(flat, batched) if b]
        return torch.func.vmap(one_sample)(inputs, G)


def make_rule(
    engine: DPGradientEngine, name: str, module: nn.Module, params: list[tuple[str, nn.Parameter]]
) -> ModuleRule:
    """Picks the per-sample rule for a module that directly owns the given trainable parameters.

    Raises:
        UnsupportedModuleError: no rule applies (the message names the module, its type and the parameters).
    """
    attrs = {attr for attr, _ in params}
    if isinstance(module, nn.Linear) and attrs <= {"weight", "bias"}:
        return LinearRule(engine, name, module, params)
    if isinstance(module, nn.Embedding) and attrs == {"weight"}:
        return EmbeddingRule(engine, name, module, params)
    if not isinstance(module, (nn.Linear, nn.Embedding)) and all(p.dim() <= 1 for _, p in params):
        return GenericRule(engine, name, module, params)
    shapes = ", ".join(f"{attr} {tuple(p.shape)}" for attr, p in params)
    raise UnsupportedModuleError(
        f"Module {_describe(name, module)} has trainable parameters ({shapes}) for which the DP engine has no "
        "exact per-sample gradient rule. Supported: nn.Linear, nn.Embedding (incl. scaled word embeddings), and "
        "modules whose own trainable parameters are vectors/scalars (norms, biases). Freeze these parameters "
        "(requires_grad=False) or use a supported layer."
    )

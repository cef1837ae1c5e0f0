"""The JAX "gemma library" parameter layout and its exact mapping to and from the HF state dict.

Pure functions over `{name: torch.Tensor}` dicts: only transposes, reshapes, slices and concatenations, so every
value is carried bit for bit. Every key is accounted for: an unknown, missing or mis-shaped key raises a
`ConversionError` naming it.

JAX layout (N heads, K key/value heads, H head_dim, D hidden, F intermediate, V vocab, paths '/'-joined)::

    transformer/embedder/input_embedding       [V', D]     V' >= V (may be padded, e.g. 256128 rows)
    transformer/layer_{i}/pre_attention_norm/scale   [D]
    transformer/layer_{i}/attn/q_einsum/w      [N, D, H]   \\ "split" attention
    transformer/layer_{i}/attn/kv_einsum/w     [2, K, D, H] /
    transformer/layer_{i}/attn/qkv_einsum/w    [3, N, D, H]  "fused" attention (K == N)
    transformer/layer_{i}/attn/attn_vec_einsum/w     [N, H, D]
    transformer/layer_{i}/pre_ffw_norm/scale   [D]
    transformer/layer_{i}/mlp/gating_einsum    [2, F, D] ("FD") or [2, D, F] ("DF"); [0] = gate, [1] = up
    transformer/layer_{i}/mlp/linear           [F, D]
    transformer/final_norm/scale               [D]

Norm scales use the `1 + scale` convention on both sides and are copied as is.

Sources checked (google-deepmind/gemma): `gemma/gm/nn/_modules.py` (the `Einsum` shapes of `Attention` and
`FeedForward`, `Embedder.input_embedding`), `gemma/gm/nn/_layers.py` (`RMSNorm.scale`, `1 + scale`),
`gemma/gm/nn/_transformer.py` (`embedder`, `layer_{i}`, `final_norm`) and `gemma/gm/ckpts/_checkpoint.py` +
`_compat.py` (the FLAT, NESTED, STACKED and KAULDRON checkpoint trees).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from .errors import ConversionError

logger = logging.get_logger(__name__)

EMBEDDING = "transformer/embedder/input_embedding"
FINAL_NORM = "transformer/final_norm/scale"
ATTENTION_LAYOUTS = ("fused", "split")
GATING_LAYOUTS = ("FD", "DF")
POST_NORMS = ("post_attention_norm", "post_ffw_norm")

_LAYER_RE = re.compile(r"^transformer/layer_(\d+)/")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_prefix(i: int) -> str:
    """JAX path prefix of decoder block `i`."""
    return f"transformer/layer_{i}/"


@dataclass(frozen=True)
class Dims:
    """The shape-defining sizes of a VaultGemma model.

    Attributes:
        vocab_size: V, rows of the HF embedding (the tokenizer's vocabulary).
        hidden_size: D.
        intermediate_size: F (each of gate and up).
        num_layers: Number of decoder blocks.
        num_heads: N.
        num_kv_heads: K.
        head_dim: H.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> Dims:
        """Reads the sizes from a transformers config object or a config dict."""
        get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=int(get("num_attention_heads")),
            num_kv_heads=int(get("num_key_value_heads") or get("num_attention_heads")),
            head_dim=int(head_dim),
        )


@dataclass
class JaxLayout:
    """The choices the JAX layout leaves open, needed to go back from HF to JAX bit for bit.

    Attributes:
        attention: `"fused"` (`qkv_einsum [3, N, D, H]`, requires K == N) or `"split"`
            (`q_einsum [N, D, H]` + `kv_einsum [2, K, D, H]`).
        gating: `"FD"` (`gating_einsum [2, F, D]`, the gemma library's `transpose_gating_einsum=True`, as in
            Gemma 2 9B/27B and Gemma 3) or `"DF"` (`[2, D, F]`, `transpose_gating_einsum=False`, as in Gemma 1 and
            Gemma 2 2B: `gemma/transformer.py`, `TransformerConfig.gemma2_2b`).
        embedding_rows: Rows of `input_embedding` in JAX (>= vocab_size; larger when the table is padded).
        dropped_keys: JAX keys that were dropped on the way to HF (only with `drop_post_norms=True`).
    """

    attention: str = "fused"
    gating: str = "FD"
    embedding_rows: int | None = None
    dropped_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.attention not in ATTENTION_LAYOUTS:
            raise ConversionError(f"attention layout must be one of {ATTENTION_LAYOUTS}, got {self.attention!r}")
        gating = str(self.gating).upper()
        if gating not in GATING_LAYOUTS:
            raise ConversionError(f"gating layout must be one of {GATING_LAYOUTS}, got {self.gating!r}")
        self.gating = gating

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JaxLayout:
        """Reads the dict written by `to_dict` (unknown keys are ignored).

        Raises:
            ConversionError: `data` is not a dict, or a value has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ConversionError(f"expected a JSON object, got {type(data).__name__}")
        known = {k: data[k] for k in ("attention", "gating", "embedding_rows", "dropped_keys") if k in data}
        rows = known.get("embedding_rows")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ConversionError(f"embedding_rows must be a positive integer or null, got {rows!r}")
        dropped = known.get("dropped_keys", [])
        if not isinstance(dropped, list) or not all(isinstance(k, str) for k in dropped):
            raise ConversionError(f"dropped_keys must be a list of strings, got {dropped!r}")
        return cls(**known)


@dataclass
class JaxToHfResult:
    """Output of `jax_to_hf`.

    Attributes:
        state_dict: HF parameters (`model.*`, no `lm_head.weight`: it is tied to the embedding).
        layout: The JAX layout that was read (to go back bit for bit).
        padding_rows: The embedding rows beyond `vocab_size` that were sliced off (None when there were none).
    """

    state_dict: dict[str, torch.Tensor]
    layout: JaxLayout
    padding_rows: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Trees and key normalisation


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens a nested dict into `{'a/b/c': leaf}`. Keys that already contain '/' (the flat layout of the
    released gemma checkpoints, e.g. `{'transformer/layer_0/attn/q_einsum': {'w': ...}}`) join the same way."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_tree` for '/'-joined keys: `{'a/b': x}` -> `{'a': {'b': x}}`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConversionError(f"key {path!r} nests under a leaf")
        node[leaf] = value
    return tree


def to_released_tree(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Canonical '/'-joined keys -> the FLAT tree of the released gemma checkpoints.

    `{'transformer/layer_0/attn/qkv_einsum': {'w': ...}, 'transformer/layer_0/mlp/gating_einsum': {'w': ...},
    'transformer/embedder': {'input_embedding': ...}, ...}`: module paths joined with '/' at the root, one level of
    leaves below, and a `w` leaf under `mlp/gating_einsum` and `mlp/linear`. This is what the gemma library's
    `flatten_and_remap_params` produces (`gemma/gm/ckpts/_compat.py`, `gemma/params.py`), and the tree both its
    loaders read: `gm.ckpts.load_params` (the `FLAT` type of `gemma/gm/ckpts/_checkpoint.py`, with or without
    `params=`) and the legacy `gemma.params.load_and_format_params`.
    """
    tree: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.endswith(("/mlp/gating_einsum", "/mlp/linear")):
            module, leaf = key, "w"
        else:
            module, leaf = key.rsplit("/", 1)
        tree.setdefault(module, {})[leaf] = value
    return tree


_STACKED_RE = re.compile(r"^(.*?)stacked_layers/attention_type_(\d+)(/.*)$")


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Splits the gemma library's STACKED layout into per-layer keys.

    `transformer/stacked_layers/attention_type_{p}/<path>` holds the tensors of layers `p, p + P, p + 2P, ...`
    stacked on a new leading axis, P being the number of attention types; slice `s` is layer `s * P + p`
    (`unstack_params` in `gemma/gm/ckpts/_compat.py`). Other keys are kept.

    Raises:
        ConversionError: a stacked layer also appears unstacked.
    """
    matches = {key: m for key in flat if (m := _STACKED_RE.match(key))}
    if not matches:
        return dict(flat)
    pattern_len = 1 + max(int(m.group(2)) for m in matches.values())
    out = {key: value for key, value in flat.items() if key not in matches}
    for key, m in matches.items():
        prefix, index, suffix = m.group(1), int(m.group(2)), m.group(3)
        value = flat[key]
        if getattr(value, "ndim", 0) < 1:
            raise ConversionError(f"{key}: a stacked-layers tensor needs a leading layer axis, got a scalar")
        for s in range(value.shape[0]):
            new = f"{prefix}layer_{s * pattern_len + index}{suffix}"
            if new in out:
                raise ConversionError(f"key {new!r} appears twice in the checkpoint (stacked and unstacked)")
            part = value[s]
            out[new] = part.clone() if isinstance(part, torch.Tensor) else part.copy()  # no shared storage
    return out


TRAINING_STATE_ROOTS = ("opt_state", "step", "collections")
"""Roots of a Kauldron trainer checkpoint (`{'params', 'opt_state', 'step', 'collections'}`) besides `params`."""
_BARE_ROOT_RE = re.compile(r"^(embedder|final_norm|layer_\d+)$")


def training_state_roots(roots: Iterable[str]) -> list[str] | None:
    """For the root keys of a checkpoint, the training-state roots to ignore when it is a trainer checkpoint.

    Returns:
        The sorted roots besides `params` (a subset of `TRAINING_STATE_ROOTS`, possibly empty) when `params` is a
        root and every other root is training state; None otherwise.
    """
    roots = set(roots)
    if "params" not in roots or not roots - {"params"} <= set(TRAINING_STATE_ROOTS):
        return None
    return sorted(roots - {"params"})


def normalize_jax_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Brings the variants of the layout found in practice to the canonical keys listed in this module.

    * a trainer checkpoint (root `params` beside `opt_state`, `step`, `collections`, as a Kauldron `TrainState`):
      only the `params` subtree is kept, the training state is dropped (with a warning);
    * a leading `params/` (flax variables `{'params': ...}`) is removed;
    * the STACKED layout (`transformer/stacked_layers/attention_type_{p}/...`, one tensor per attention type with
      the layers on a leading axis) is split into `transformer/layer_{i}/...` (see `unstack_layers`);
    * a tree without the `transformer` level (`{'embedder', 'layer_0', ..., 'final_norm'}`: the Flax
      `model.init()['params']` structure, which `gm.ckpts.save_params` writes) gets the `transformer/` prefix;
    * `mlp/gating_einsum/w` and `mlp/linear/w` (the raw released checkpoints, before the gemma library's
      `param_remapper`) become `mlp/gating_einsum` and `mlp/linear`.
    """
    roots = {key.split("/", 1)[0] for key in flat}
    ignored = training_state_roots(roots)
    if ignored:
        logger.warning(
            f"trainer checkpoint: converting its 'params' only; ignored {', '.join(ignored)} (training state)"
        )
        flat = {k: v for k, v in flat.items() if k.split("/", 1)[0] not in ignored}
    stripped: dict[str, Any] = {}
    for key, value in flat.items():
        new = key.removeprefix("params/")
        if new in stripped:
            raise ConversionError(f"key {new!r} appears twice in the checkpoint (as {key!r} and another spelling)")
        stripped[new] = value
    flat = unstack_layers(stripped)
    new_roots = {key.split("/", 1)[0] for key in flat}
    bare = "transformer" not in new_roots and any(_BARE_ROOT_RE.match(root) for root in new_roots)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        new = ("transformer/" if bare else "") + key
        for name in ("gating_einsum", "linear"):
            if new.endswith(f"/mlp/{name}/w"):
                new = new[: -len("/w")]
        if new in out:
            raise ConversionError(f"key {new!r} appears twice in the checkpoint (as {key!r} and another spelling)")
        out[new] = value
    return out


def count_layers(keys: Iterable[str], pattern: re.Pattern = _LAYER_RE) -> int:
    """Number of decoder blocks: 1 + the largest layer index among the keys (0 when there is none)."""
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


# ----------------------------------------------------------------------------------------------------------------
# Layout detection and expected keys/shapes


def detect_attention_layout(keys: Iterable[str], num_layers: int) -> str:
    """Returns `"fused"` or `"split"`; every layer must use the same one."""
    keys = set(keys)
    found = {}
    for i in range(num_layers):
        p = layer_prefix(i) + "attn/"
        fused, split = p + "qkv_einsum/w" in keys, (p + "q_einsum/w" in keys or p + "kv_einsum/w" in keys)
        if fused and split:
            raise ConversionError(f"layer_{i} has both {p}qkv_einsum/w and {p}q_einsum/w or kv_einsum/w")
        if fused or split:
            found[i] = "fused" if fused else "split"
    kinds = set(found.values())
    if len(kinds) > 1:
        fused_layers = sorted(i for i, k in found.items() if k == "fused")
        raise ConversionError(f"mixed attention layouts: layers {fused_layers} use qkv_einsum, others q/kv_einsum")
    return kinds.pop() if kinds else "fused"


def detect_gating_layout(key: str, shape: tuple[int, ...], dims: Dims, explicit: str | None = None) -> str:
    """Tells `[2, F, D]` ("FD") from `[2, D, F]` ("DF").

    Args:
        key: The key of the tensor (for error messages).
        shape: Its shape.
        dims: Model sizes (D and F).
        explicit: The layout the user asserted, if any; required when F == D (both readings fit the shape).

    Returns:
        `"FD"` or `"DF"`.
    """
    d, f = dims.hidden_size, dims.intermediate_size
    explicit = explicit.upper() if explicit else None
    if tuple(shape) not in {(2, f, d), (2, d, f)}:
        raise ConversionError(f"{key}: shape {tuple(shape)} is neither [2, F, D] = (2, {f}, {d}) nor [2, D, F]")
    if f == d:
        if explicit is None:
            raise ConversionError(
                f"{key}: shape {tuple(shape)} is ambiguous because intermediate_size == hidden_size == {d}: "
                "[2, F, D] and [2, D, F] look the same. Say which one it is with --gating-layout FD|DF "
                "(FD = [2, F, D], the gemma library's transpose_gating_einsum=True as in Gemma 2 9B/27B and Gemma 3; "
                "DF = [2, D, F], transpose_gating_einsum=False as in Gemma 1 and Gemma 2 2B)"
            )
        return explicit
    detected = "FD" if tuple(shape) == (2, f, d) else "DF"
    if explicit is not None and explicit != detected:
        raise ConversionError(f"{key}: shape {tuple(shape)} is the {detected} layout, but {explicit} was asked for")
    return detected


def expected_jax_shapes(dims: Dims, layout: JaxLayout) -> dict[str, tuple[int, ...]]:
    """Every key of the canonical JAX layout with its shape."""
    v, d, f = layout.embedding_rows or dims.vocab_size, dims.hidden_size, dims.intermediate_size
    n, k, h = dims.num_heads, dims.num_kv_heads, dims.head_dim
    if layout.attention == "fused" and k != n:
        raise ConversionError(f"fused qkv_einsum needs num_key_value_heads == num_attention_heads, got {k} != {n}")
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (v, d)}
    for i in range(dims.num_layers):
        p = layer_prefix(i)
        shapes[p + "pre_attention_norm/scale"] = (d,)
        if layout.attention == "fused":
            shapes[p + "attn/qkv_einsum/w"] = (3, n, d, h)
        else:
            shapes[p + "attn/q_einsum/w"] = (n, d, h)
            shapes[p + "attn/kv_einsum/w"] = (2, k, d, h)
        shapes[p + "attn/attn_vec_einsum/w"] = (n, h, d)
        shapes[p + "pre_ffw_norm/scale"] = (d,)
        shapes[p + "mlp/gating_einsum"] = (2, f, d) if layout.gating == "FD" else (2, d, f)
        shapes[p + "mlp/linear"] = (f, d)
    shapes[FINAL_NORM] = (d,)
    return shapes


def expected_hf_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """Every persistent parameter of `VaultGemmaForCausalLM` (without the tied `lm_head.weight`) with its shape."""
    v, d, f = dims.vocab_size, dims.hidden_size, dims.intermediate_size
    nh, kh = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (nh, d)
        shapes[p + "self_attn.k_proj.weight"] = (kh, d)
        shapes[p + "self_attn.v_proj.weight"] = (kh, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, nh)
        shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    return shapes


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(present: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raises naming every missing and unknown key (sorted, the first few of each)."""
    present, expected = set(present), set(expected)
    missing, unknown = expected - present, present - expected
    problems = []
    if missing:
        problems.append(f"missing key(s): {_names(missing)}")
    if unknown:
        problems.append(f"unknown key(s): {_names(unknown)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...], dims_text: str = "") -> None:
    """Raises naming `key` when `tensor.shape != expected`."""
    if tuple(tensor.shape) != tuple(expected):
        hint = f" [{dims_text}]" if dims_text else ""
        raise ConversionError(
            f"{key}: shape {tuple(tensor.shape)} does not match the expected {tuple(expected)}{hint}"
        )


# ----------------------------------------------------------------------------------------------------------------
# JAX -> HF


def find_post_norm_keys(keys: Iterable[str]) -> list[str]:
    """Keys of Gemma-2-style post-attention / post-feedforward norms (VaultGemma has none)."""
    return sorted(k for k in keys if any(f"/{name}/" in k or k.endswith(f"/{name}") for name in POST_NORMS))


def jax_to_hf(
    params: Mapping[str, torch.Tensor],
    config: Any,
    *,
    gating_layout: str | None = None,
    drop_post_norms: bool = False,
) -> JaxToHfResult:
    """Maps a JAX-layout parameter dict to the HF `VaultGemmaForCausalLM` state dict.

    Args:
        params: Canonical '/'-joined keys (see `normalize_jax_keys`) to tensors.
        config: A VaultGemma config (object or dict) giving V, D, F, layers, N, K, H.
        gating_layout: `"FD"` or `"DF"`; detected from shapes when None (required when F == D).
        drop_post_norms: Drop `post_attention_norm`/`post_ffw_norm` instead of refusing. VaultGemma has no such
            norms and an RMSNorm is never the identity (even with scale 0 it normalises), so the converted model
            then computes a different function from a JAX model that applied them.

    Returns:
        The HF state dict, the detected layout and the sliced-off embedding rows.

    Raises:
        ConversionError: naming the first problem key (unknown, missing, mis-shaped, post-norm...).
    """
    dims = Dims.from_config(config)
    params = dict(params)
    post = find_post_norm_keys(params)
    if post and not drop_post_norms:
        raise ConversionError(
            f"the checkpoint has post-attention/post-feedforward norms ({_names(post, 4)}). VaultGemma has only "
            "pre-norms, and an RMSNorm is never the identity (it normalises even when its scale is 0), so these "
            "weights cannot be represented: this looks like a Gemma 2 checkpoint. Pass --drop-post-norms only if "
            "your JAX model never applied them (the converted model computes the block without them)"
        )
    for key in post:
        del params[key]

    layout = JaxLayout(attention=detect_attention_layout(params, dims.num_layers), dropped_keys=post)
    # The gating layout and the embedding rows are read from the shapes before checking all of them.
    first_gating = layer_prefix(0) + "mlp/gating_einsum"
    if dims.num_layers and first_gating in params:
        layout.gating = detect_gating_layout(first_gating, tuple(params[first_gating].shape), dims, gating_layout)
    elif gating_layout:
        layout.gating = gating_layout.upper()
    if EMBEDDING in params:
        rows = params[EMBEDDING].shape[0] if params[EMBEDDING].ndim == 2 else dims.vocab_size
        if rows < dims.vocab_size:
            raise ConversionError(f"{EMBEDDING}: {rows} rows, fewer than vocab_size = {dims.vocab_size} of the config")
        layout.embedding_rows = int(rows)
    expected = expected_jax_shapes(dims, layout)
    check_keys(params, expected, "JAX checkpoint")
    text = (
        f"V={dims.vocab_size}, D={dims.hidden_size}, F={dims.intermediate_size}, N={dims.num_heads}, "
        f"K={dims.num_kv_heads}, H={dims.head_dim}"
    )
    for key, shape in expected.items():
        check_shape(key, params[key], shape, text)

    d, n, h = dims.hidden_size, dims.num_heads, dims.head_dim
    out: dict[str, torch.Tensor] = {}
    embedding = params.pop(EMBEDDING)
    padding_rows = None
    if embedding.shape[0] > dims.vocab_size:
        padding_rows = embedding[dims.vocab_size :].clone()
        embedding = embedding[: dims.vocab_size]
    out["model.embed_tokens.weight"] = embedding.contiguous()

    def heads_in(w: torch.Tensor) -> torch.Tensor:  # [heads, D, H] -> [heads * H, D]
        return w.permute(0, 2, 1).reshape(w.shape[0] * h, d).contiguous()

    for i in range(dims.num_layers):
        p, q = layer_prefix(i), f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = params.pop(p + "pre_attention_norm/scale")
        if layout.attention == "fused":
            qkv = params.pop(p + "attn/qkv_einsum/w")  # [3, N, D, H]
            wq, wk, wv = qkv[0], qkv[1], qkv[2]
        else:
            wq = params.pop(p + "attn/q_einsum/w")  # [N, D, H]
            kv = params.pop(p + "attn/kv_einsum/w")  # [2, K, D, H]
            wk, wv = kv[0], kv[1]
        out[q + "self_attn.q_proj.weight"] = heads_in(wq)
        out[q + "self_attn.k_proj.weight"] = heads_in(wk)
        out[q + "self_attn.v_proj.weight"] = heads_in(wv)
        wo = params.pop(p + "attn/attn_vec_einsum/w")  # [N, H, D]
        out[q + "self_attn.o_proj.weight"] = wo.reshape(n * h, d).T.contiguous()
        out[q + "pre_feedforward_layernorm.weight"] = params.pop(p + "pre_ffw_norm/scale")
        gating = params.pop(p + "mlp/gating_einsum")
        if layout.gating == "DF":  # [2, D, F] -> [2, F, D]
            gating = gating.transpose(1, 2)
        out[q + "mlp.gate_proj.weight"] = gating[0].contiguous()
        out[q + "mlp.up_proj.weight"] = gating[1].contiguous()
        out[q + "mlp.down_proj.weight"] = params.pop(p + "mlp/linear").T.contiguous()  # [F, D] -> [D, F]
    out["model.norm.weight"] = params.pop(FINAL_NORM)
    return JaxToHfResult(state_dict=out, layout=layout, padding_rows=padding_rows)


# ----------------------------------------------------------------------------------------------------------------
# HF -> JAX


def strip_tied_head(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes `lm_head.weight` after checking that it equals the embedding (VaultGemma ties them)."""
    state = dict(state_dict)
    head = state.pop("lm_head.weight", None)
    embed = state.get("model.embed_tokens.weight")
    if head is not None and embed is not None:
        same = head.shape == embed.shape and (head.data_ptr() == embed.data_ptr() or torch.equal(head, embed))
        if not same:
            raise ConversionError(
                "lm_head.weight differs from model.embed_tokens.weight: VaultGemma ties them (the JAX layout has "
                "only the embedding), so an untied output layer cannot be converted"
            )
    return state


def hf_to_jax(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    layout: JaxLayout | None = None,
    *,
    padding_rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Maps an HF `VaultGemmaForCausalLM` state dict to the canonical JAX layout.

    Args:
        state_dict: HF parameters (`lm_head.weight` may be present if equal to the embedding).
        config: The VaultGemma config (object or dict).
        layout: Target layout; default fused attention when K == N (what the gemma library does), "FD" gating,
            no embedding padding.
        padding_rows: Rows appended to the embedding when `layout.embedding_rows > vocab_size` (zeros if None).

    Returns:
        `{canonical JAX key: tensor}`.
    """
    dims = Dims.from_config(config)
    if layout is None:
        layout = JaxLayout(attention="fused" if dims.num_kv_heads == dims.num_heads else "split")
    state = strip_tied_head(state_dict)
    expected = expected_hf_shapes(dims)
    check_keys(state, expected, "HF checkpoint")
    for key, shape in expected.items():
        check_shape(key, state[key], shape)
    rows = layout.embedding_rows or dims.vocab_size
    if rows < dims.vocab_size:
        raise ConversionError(f"JAX embedding rows ({rows}) must be >= vocab_size ({dims.vocab_size})")
    if layout.attention == "fused" and dims.num_kv_heads != dims.num_heads:
        raise ConversionError(
            f"fused qkv_einsum needs num_key_value_heads == num_attention_heads, got "
            f"{dims.num_kv_heads} != {dims.num_heads}: use the split layout"
        )

    d, n, k, h = dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim
    out: dict[str, torch.Tensor] = {}
    embed = state["model.embed_tokens.weight"]
    if rows > dims.vocab_size:
        extra = rows - dims.vocab_size
        if padding_rows is None:
            padding_rows = torch.zeros(extra, d, dtype=embed.dtype)
        if tuple(padding_rows.shape) != (extra, d):
            raise ConversionError(f"padding rows have shape {tuple(padding_rows.shape)}, expected {(extra, d)}")
        embed = torch.cat([embed, padding_rows.to(embed.dtype)], dim=0)
    out[EMBEDDING] = embed.contiguous()

    def heads_out(w: torch.Tensor, heads: int) -> torch.Tensor:  # [heads * H, D] -> [heads, D, H]
        return w.reshape(heads, h, d).permute(0, 2, 1).contiguous()

    for i in range(dims.num_layers):
        p, q = layer_prefix(i), f"model.layers.{i}."
        out[p + "pre_attention_norm/scale"] = state[q + "input_layernorm.weight"].contiguous()
        wq = heads_out(state[q + "self_attn.q_proj.weight"], n)
        wk = heads_out(state[q + "self_attn.k_proj.weight"], k)
        wv = heads_out(state[q + "self_attn.v_proj.weight"], k)
        if layout.attention == "fused":
            out[p + "attn/qkv_einsum/w"] = torch.stack([wq, wk, wv])
        else:
            out[p + "attn/q_einsum/w"] = wq
            out[p + "attn/kv_einsum/w"] = torch.stack([wk, wv])
        out[p + "attn/attn_vec_einsum/w"] = state[q + "self_attn.o_proj.weight"].T.reshape(n, h, d).contiguous()
        out[p + "pre_ffw_norm/scale"] = state[q + "pre_feedforward_layernorm.weight"].contiguous()
        gating = torch.stack([state[q + "mlp.gate_proj.weight"], state[q + "mlp.up_proj.weight"]])  # [2, F, D]
        if layout.gating == "DF":
            gating = gating.transpose(1, 2)
        out[p + "mlp/gating_einsum"] = gating.contiguous()
        out[p + "mlp/linear"] = state[q + "mlp.down_proj.weight"].T.contiguous()
    out[FINAL_NORM] = state["model.norm.weight"].contiguous()
    return out

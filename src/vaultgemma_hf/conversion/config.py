"""VaultGemma configs for conversion: named presets, inference from JAX shapes, validated overrides."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from transformers.utils import logging

from .errors import ConversionError
from .files import read_json_object
from .layout import EMBEDDING, count_layers, detect_attention_layout, layer_prefix

logger = logging.get_logger(__name__)

GEMMA_PADDED_VOCAB = 256128
"""Rows of the embedding table of the original Gemma JAX checkpoints (the SentencePiece vocabulary has 256000)."""
GEMMA_VOCAB = 256000

SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)

DEFAULTS: dict[str, Any] = {
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "sliding_window": 512,
}
"""Values shapes cannot tell; those of the released VaultGemma 1B. (`sliding_window` is never applied: every layer
is `full_attention`. It is kept at the released value because transformers' built-in class builds a sliding mask
anyway and fails on None.)"""

FIXED: dict[str, Any] = {
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "tie_word_embeddings": True,
}
"""VaultGemma invariants (plus `layer_types` all `full_attention`): not overridable."""

PRESETS: dict[str, dict[str, Any]] = {
    "vaultgemma-1b": {
        "vocab_size": 256000,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "max_position_embeddings": 1024,
    },
    "tiny": {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "max_position_embeddings": 64,
    },
}
"""Named variants for `--config NAME`."""


def model_classes():
    """Returns `(VaultGemmaConfig, VaultGemmaForCausalLM)`: this package's classes.

    The package's classes use the same parameter names and config keys as transformers' built-in VaultGemma, so
    checkpoints written here load in either.
    """
    from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM

    return VaultGemmaConfig, VaultGemmaForCausalLM


def _known_config_keys() -> set[str]:
    config_class, _ = model_classes()
    return set(config_class().to_dict()) | {"rope_theta"}


def parse_overrides(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parses `KEY=VALUE` strings (VALUE as JSON when it parses, else as a string) into a dict.

    Raises:
        ConversionError: for a malformed item, an unknown key or a VaultGemma invariant.
    """
    if not items:
        return {}
    if isinstance(items, Mapping):
        out = dict(items)
    else:
        out = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConversionError(f"config override {item!r} is not KEY=VALUE")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            out[key.strip()] = value
    check_overridable(out, "config override")
    return out


def check_overridable(values: Mapping[str, Any], what: str) -> None:
    """Refuses keys that do not exist in the config and values that break VaultGemma's invariants."""
    known = _known_config_keys()
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConversionError(f"{what}: unknown config key(s) {unknown}")
    for key, fixed in FIXED.items():
        if key in values and values[key] != fixed:
            raise ConversionError(f"{what}: {key}={values[key]!r} is not VaultGemma (it must be {fixed!r})")
    layer_types = values.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ConversionError(f"{what}: VaultGemma uses full attention in every layer (layer_types={layer_types})")


def load_base_config(spec: str | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """Resolves `--config`: a preset name, a path to a `config.json` (or a directory holding one), or a dict.

    Returns:
        The values and a description of where they came from (for messages).
    """
    if spec is None:
        return {}, "shapes"
    if isinstance(spec, Mapping):
        return dict(spec), "the given config"
    if spec in PRESETS:
        return dict(PRESETS[spec]), f"preset {spec!r}"
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConversionError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    data = read_json_object(path, "--config")
    if data.get("model_type", "vaultgemma") != "vaultgemma":
        raise ConversionError(f"{path}: model_type is {data['model_type']!r}, expected 'vaultgemma'")
    ignored = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "auto_map"}
    ignored |= {k for k in data if k.startswith("_")}
    return {k: v for k, v in data.items() if k not in ignored}, path


def infer_dims_from_jax(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int], dict[str, str]]:
    """Reads the model sizes from the shapes of a (normalised) JAX parameter dict.

    Returns:
        `({config key: size}, {config key: the JAX key it was read from})`, with `vocab_size` = embedding rows.
    """
    if EMBEDDING not in shapes:
        raise ConversionError(f"missing key {EMBEDDING} (is this a gemma-layout checkpoint?)")
    if len(shapes[EMBEDDING]) != 2:
        raise ConversionError(f"{EMBEDDING}: expected 2 dimensions [V, D], got shape {tuple(shapes[EMBEDDING])}")
    num_layers = count_layers(shapes)
    if num_layers == 0:
        raise ConversionError("no transformer/layer_N/... keys found (is this a gemma-layout checkpoint?)")
    rows, hidden = shapes[EMBEDDING]
    p = layer_prefix(0)
    attention = detect_attention_layout(shapes, num_layers)

    def shape_of(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise ConversionError(f"missing key {key}")
        if len(shapes[key]) != ndim:
            raise ConversionError(f"{key}: expected {ndim} dimensions, got shape {tuple(shapes[key])}")
        return tuple(shapes[key])

    if attention == "fused":
        key = p + "attn/qkv_einsum/w"
        _, heads, _, head_dim = shape_of(key, 4)
        kv_heads, kv_key = heads, key
    else:
        key = p + "attn/q_einsum/w"
        heads, _, head_dim = shape_of(key, 3)
        kv_key = p + "attn/kv_einsum/w"
        kv_heads = shape_of(kv_key, 4)[1]
    linear = p + "mlp/linear"
    intermediate = shape_of(linear, 2)[0]
    dims = {
        "vocab_size": rows,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
    }
    sources = {
        "vocab_size": EMBEDDING,
        "hidden_size": EMBEDDING,
        "intermediate_size": linear,
        "num_hidden_layers": "transformer/layer_N keys",
        "num_attention_heads": key,
        "num_key_value_heads": kv_key,
        "head_dim": key,
    }
    return {k: int(v) for k, v in dims.items()}, sources


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    base: str | Mapping[str, Any] | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds VaultGemma config values for a JAX checkpoint.

    Precedence: `overrides` > `base` (preset / config.json) > shapes > `DEFAULTS`. Sizes given by `base` or
    `overrides` must agree with the shapes, except `vocab_size`, which may be smaller than the embedding rows
    (a padded table, sliced on conversion). Without an explicit vocab size, an embedding of 256128 rows (the
    padded Gemma table) is read as vocabulary 256000.

    Args:
        shapes: `{normalised JAX key: shape}`.
        base: A preset name, a config.json path or a dict.
        overrides: `KEY=VALUE` strings or a dict.

    Returns:
        Keyword arguments for `VaultGemmaConfig`.
    """
    inferred, sources = infer_dims_from_jax(shapes)
    base_values, origin = load_base_config(base)
    if base_values:
        check_overridable({k: v for k, v in base_values.items() if k in FIXED or k == "layer_types"}, origin)
    override_values = parse_overrides(overrides)
    values: dict[str, Any] = {**DEFAULTS, **inferred}
    for given, where in ((base_values, origin), (override_values, "--override")):
        for key, value in given.items():
            if key in SHAPE_KEYS and key != "vocab_size" and value != inferred[key]:
                raise ConversionError(
                    f"{where} sets {key}={value} but the checkpoint has {key}={inferred[key]} "
                    f"(from the shape of {sources[key]} = {tuple(shapes.get(sources[key], ()))})"
                )
    explicit_vocab = override_values.get("vocab_size", base_values.get("vocab_size"))
    rows = inferred["vocab_size"]
    if explicit_vocab is None and rows == GEMMA_PADDED_VOCAB:
        explicit_vocab = GEMMA_VOCAB
        logger.warning(
            f"{EMBEDDING} has {rows} rows, the padded Gemma table: using vocab_size={GEMMA_VOCAB} (the Gemma "
            f"tokenizer). Pass --override vocab_size={rows} to keep every row."
        )
    if explicit_vocab is not None:
        if int(explicit_vocab) > rows:
            raise ConversionError(f"vocab_size={explicit_vocab} is larger than the {rows} rows of {EMBEDDING}")
        values["vocab_size"] = int(explicit_vocab)
    values.update({k: v for k, v in base_values.items() if k not in SHAPE_KEYS})
    values.update({k: v for k, v in override_values.items() if k not in SHAPE_KEYS})
    values.setdefault("query_pre_attn_scalar", values["head_dim"])
    if "rope_theta" in values:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta(values.pop("rope_theta"))}
    values["layer_types"] = ["full_attention"] * values["num_hidden_layers"]
    values.update(FIXED)
    return values


def rope_theta(value: Any) -> float:
    """Reads a `rope_theta` value (a positive number).

    Raises:
        ConversionError: naming the value when it is not a positive number.
    """
    try:
        theta = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        theta = float("nan")
    if not theta > 0 or theta == float("inf"):
        raise ConversionError(f"rope_theta={value!r} is not a positive number (e.g. --override rope_theta=10000)")
    return theta


def make_config(values: Mapping[str, Any], *, dtype: str | None = None):
    """Creates the `VaultGemmaConfig` object (with `architectures` set) from config values."""
    config_class, _ = model_classes()
    values = dict(values)
    if "rope_theta" in values:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta(values.pop("rope_theta"))}
    values.setdefault("layer_types", ["full_attention"] * int(values["num_hidden_layers"]))
    try:
        config = config_class(**values)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"invalid VaultGemma config: {err}") from err
    config.architectures = ["VaultGemmaForCausalLM"]
    if dtype is not None:
        config.dtype = dtype
    return config


def vaultgemma_deviations(config: Any) -> list[str]:
    """Lists the ways an HF config departs from the VaultGemma architecture (empty for a VaultGemma)."""
    problems = []
    for key, fixed in FIXED.items():
        if getattr(config, key, fixed) != fixed:
            problems.append(f"{key}={getattr(config, key)!r} (VaultGemma: {fixed!r})")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append("sliding-window layers in layer_types (VaultGemma: full attention everywhere)")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r} (VaultGemma: 'default')")
    activation = getattr(config, "hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        problems.append(f"hidden_activation={activation!r} (VaultGemma: 'gelu_pytorch_tanh')")
    return problems

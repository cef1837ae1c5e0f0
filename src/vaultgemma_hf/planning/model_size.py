"""Parameter count M of a VaultGemma model from its config fields (the M of the compute law C ≈ 6·M·B·S·T)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VAULTGEMMA_1B_PARAMETERS = 1_038_741_120
"""Parameters of the released ``google/vaultgemma-1b`` (embedding 294.9M + 26 layers x 28.61M)."""

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config field {key!r} must be a positive integer, got {value!r}.")
    return value


def count_parameters(config: Mapping[str, Any] | Any) -> int:
    """Number of distinct parameters of a VaultGemma causal LM described by ``config``.

    Architecture (pre-norm Gemma-2 blocks): token embedding ``V x H``; per layer the q/k/v/o projections
    (``H x n·d``, ``H x k·d`` twice, ``n·d x H``, plus biases if ``attention_bias``), the GeGLU MLP (gate and up
    ``H x I``, down ``I x H``) and two RMSNorm weights (``input_layernorm``, ``pre_feedforward_layernorm``);
    a final RMSNorm; the LM head shares the embedding unless ``tie_word_embeddings`` is False.

    Args:
        config: A mapping of config fields (e.g. a parsed ``config.json``) or a config object with those
            attributes (``transformers.VaultGemmaConfig``).

    Returns:
        The parameter count.

    Raises:
        ValueError: If a required field is missing or invalid.
    """
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise ValueError(f"config lacks the field(s) {missing} needed to count parameters.")
    vocab, hidden, inter, layers, heads = (_positive_int(config, key) for key in _REQUIRED)
    kv_heads = _positive_int(config, "num_key_value_heads") if config.get("num_key_value_heads") else heads
    head_dim = _positive_int(config, "head_dim") if config.get("head_dim") else hidden // heads
    if head_dim < 1:
        raise ValueError(f"head_dim is not positive (hidden_size={hidden}, num_attention_heads={heads}).")
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    if config.get("attention_bias", False):
        attention += q_dim + 2 * kv_dim + hidden
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    embedding = vocab * hidden
    lm_head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    return embedding + layers * per_layer + hidden + lm_head


def load_model_config(source: str | os.PathLike) -> dict[str, Any]:
    """Reads a config from a ``config.json`` file, a model directory containing one, or a preset name.

    Presets are those of `vaultgemma_hf.conversion.config.PRESETS` (e.g. ``"vaultgemma-1b"``, ``"tiny"``).

    Raises:
        ValueError: If ``source`` is neither a readable JSON config nor a preset.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        from vaultgemma_hf.conversion.config import PRESETS  # the project's named configs (imports transformers)

        if str(source) in PRESETS:
            return dict(PRESETS[str(source)])
        raise ValueError(
            f"model config {str(source)!r} is neither a config.json file, a model directory, nor a preset "
            f"({', '.join(PRESETS)})."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid JSON config: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    if config.get("model_type") not in (None, "vaultgemma"):
        raise ValueError(
            f"{path} has model_type={config.get('model_type')!r}; the parameter count assumes VaultGemma's layout."
        )
    return config

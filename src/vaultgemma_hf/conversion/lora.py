"""Merging a PEFT (LoRA) adapter into base weights, to export a plain HF checkpoint.

This is the usual last step after DP-LoRA training: the adapter's low-rank updates are added to the base weights
(`W + scaling * B @ A`) by PEFT's own `merge_and_unload`, in fp32, and the result is a regular VaultGemma state
dict. Adapters are read from safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import model_classes
from .errors import ConversionError, MissingDependencyError
from .layout import strip_tied_head

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def build_model(config: Any, state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float32):
    """Creates a `VaultGemmaForCausalLM` holding exactly `state_dict` (cast to `dtype`), without a random init.

    Raises:
        ConversionError: naming missing or unexpected keys.
    """
    from accelerate import init_empty_weights

    _, model_class = model_classes()
    state = {k: v.to(dtype) for k, v in strip_tied_head(state_dict).items()}
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"state dict does not fit the model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    return model.eval()


def check_adapter_dir(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Checks that `adapter_dir` is a PEFT adapter saved with safetensors; returns its `adapter_config.json`."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ConversionError(f"--merge-lora {adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in adapter_dir.glob("adapter_model.*"))
        hint = f" (found {', '.join(found)}: pickle files are never loaded)" if found else ""
        raise ConversionError(f"--merge-lora {adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    with open(adapter_dir / ADAPTER_CONFIG, encoding="utf-8") as f:
        return json.load(f)


def load_peft_model(base_model: torch.nn.Module, adapter_dir: str | os.PathLike):
    """Wraps `base_model` with the adapter (PEFT's `PeftModel.from_pretrained`, inference mode)."""
    check_adapter_dir(adapter_dir)
    try:
        from peft import PeftModel
    except ImportError as err:
        raise MissingDependencyError("merging an adapter needs `peft`: pip install 'vaultgemma-hf[peft]'") from err
    try:
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False).eval()
    except (ValueError, KeyError, RuntimeError) as err:
        raise ConversionError(f"--merge-lora {adapter_dir}: cannot apply the adapter to this model: {err}") from err


def merge_lora(
    state_dict: Mapping[str, torch.Tensor], config: Any, adapter_dir: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Merges a PEFT adapter into base weights (in fp32) and returns the merged `model.*` state dict.

    Args:
        state_dict: Base HF parameters.
        config: The base `VaultGemmaConfig`.
        adapter_dir: Directory with `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        fp32 merged parameters, without the tied `lm_head.weight`.

    Raises:
        ConversionError: the adapter does not fit, or it made the output layer differ from the (tied) embedding.
    """
    model = build_model(config, state_dict)
    peft_model = load_peft_model(model, adapter_dir)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # NaNs found by safe_merge, or an adapter type without merging
        raise ConversionError(f"--merge-lora {adapter_dir}: merging failed: {err}") from err
    state = {k: v.detach() for k, v in merged.state_dict().items()}
    return strip_tied_head(state)

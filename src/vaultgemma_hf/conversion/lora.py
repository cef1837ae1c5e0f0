"""Merging a PEFT (LoRA) adapter into base weights, to export a plain HF checkpoint.

This is the usual last step after DP-LoRA training: the adapter's low-rank updates are added to the base weights
(`W + scaling * B @ A`) by PEFT's own `merge_and_unload`, in fp32, and the result is a regular VaultGemma state
dict. Adapters are read from safetensors only. Adapters that would untie `lm_head` from the embedding are refused
(`check_tied_layers`), and every merge is checked against the PEFT model on a short prompt before it is returned.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import model_classes
from .errors import ConversionError, MissingDependencyError
from .files import read_json_object
from .layout import strip_tied_head
from .verify import DEFAULT_RTOL, compare_logits, hf_logits, random_prompts

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
    return read_json_object(adapter_dir / ADAPTER_CONFIG, "--merge-lora")


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


TIE_RTOL = 1e-6
"""The adapted `lm_head` must equal the adapted embedding within this, relative to max(1, max |weight|)."""
CHECK_TOKENS = 8
"""Length of the prompt of the check that always runs after merging (merged model vs PEFT model)."""
CHECK_RTOL = DEFAULT_RTOL
"""Tolerance of that check: max |logit difference| relative to max(1, max |PEFT logit|), both in fp32."""


def _is_adapted(module: torch.nn.Module) -> bool:
    """True for a module PEFT wrapped (a tuner layer such as LoRA's, or a `modules_to_save` copy)."""
    return hasattr(module, "base_layer") or hasattr(module, "unload_and_optionally_merge_module")


def _describe(module: torch.nn.Module) -> str:
    if hasattr(module, "unload_and_optionally_merge_module"):
        return f"a {type(module).__name__} (modules_to_save / trainable tokens)"
    kind = "LoRA" if "lora" in type(module).__module__ else type(module).__module__.rsplit(".", 2)[-2]
    return f"a {kind} layer"


def adapted_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight `module` applies with the adapter, merged by PEFT into a copy of this module alone.

    `module` itself is left untouched (a tied weight shared with another module is not changed).
    """
    if hasattr(module, "unload_and_optionally_merge_module"):  # modules_to_save, trainable tokens
        module = copy.deepcopy(module).unload_and_optionally_merge_module(
            merge=True, safe_merge=True, adapter_names=None
        )
    elif hasattr(module, "base_layer"):  # a tuner layer (LoRA, DoRA, ...)
        module = copy.deepcopy(module)
        module.merge(safe_merge=True)
        module = module.get_base_layer()
    return module.weight.detach()


def check_tied_layers(peft_model: torch.nn.Module, adapter_dir: str | os.PathLike) -> torch.Tensor | None:
    """Checks that the adapter keeps `lm_head` equal to the input embedding, as the tied output layer must be.

    VaultGemma's `lm_head` is tied to `model.embed_tokens`: a merged checkpoint stores one matrix for both. An
    adapter that changes only one of them (a LoRA layer on `embed_tokens` without PEFT's `ensure_weight_tying`,
    a `modules_to_save` copy of it, a LoRA layer on `lm_head` alone) computes a function that no tied checkpoint
    can represent: merging would silently apply the change to both.

    Returns:
        The adapted embedding (what the merged checkpoint must hold) when the adapter touches the embedding or
        `lm_head`; None when it touches neither.

    Raises:
        ConversionError: naming the module(s), when the adapted `lm_head` and embedding differ.
    """
    inner = peft_model.get_base_model()
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    embed_adapted, head_adapted = _is_adapted(embed), _is_adapted(head)
    if not (embed_adapted or head_adapted):
        return None
    embedding, output = adapted_weight(embed), adapted_weight(head)
    if embedding.shape == output.shape:
        diff = float((embedding.float() - output.float()).abs().max())
        tolerance = TIE_RTOL * max(1.0, float(embedding.float().abs().max()))
        if diff <= tolerance:
            return embedding
    else:
        diff = float("inf")
    if embed_adapted and not head_adapted:
        what = (
            f"it puts {_describe(embed)} on model.embed_tokens but nothing on lm_head: in the PEFT model it changes "
            "the input embedding only, while lm_head keeps the base weights"
        )
    elif head_adapted and not embed_adapted:
        what = (
            f"it puts {_describe(head)} on lm_head but nothing on model.embed_tokens: in the PEFT model it changes "
            "the output layer only, while the input embedding keeps the base weights"
        )
    else:
        what = "its layers on model.embed_tokens and on lm_head make them differ"
    raise ConversionError(
        f"--merge-lora {adapter_dir}: {what} (max |difference| {diff:.3g}). VaultGemma ties lm_head to "
        "model.embed_tokens (one matrix for both), so the merged checkpoint would apply the change to both and "
        "compute a different model; nothing was written. Train with LoraConfig(ensure_weight_tying=True), which "
        "ties the two adapters, or leave embed_tokens and lm_head out of target_modules and modules_to_save"
    )


def merge_lora(
    state_dict: Mapping[str, torch.Tensor], config: Any, adapter_dir: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Merges a PEFT adapter into base weights (in fp32) and returns the merged `model.*` state dict.

    Before merging, `check_tied_layers` refuses adapters that untie the output layer from the embedding. After
    merging, a short prompt (`CHECK_TOKENS` tokens) always runs through the merged weights, as the written model
    would use them (with `lm_head` tied), and through the PEFT model: their fp32 logits must agree within
    `CHECK_RTOL` × max(1, max |logit|).

    Args:
        state_dict: Base HF parameters.
        config: The base `VaultGemmaConfig`.
        adapter_dir: Directory with `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        fp32 merged parameters, without the tied `lm_head.weight`.

    Raises:
        ConversionError: the adapter does not fit, it makes the output layer differ from the (tied) embedding, or
            the merged weights do not reproduce the PEFT model.
    """
    model = build_model(config, state_dict)
    peft_model = load_peft_model(model, adapter_dir)
    adapted_embedding = check_tied_layers(peft_model, adapter_dir)
    seq_len = max(1, min(CHECK_TOKENS, int(config.max_position_embeddings)))
    tokens = random_prompts(config.vocab_size, num_prompts=1, seq_len=seq_len, seed=0)
    reference = hf_logits(peft_model, tokens)  # before merging: merge_and_unload changes the model in place
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # NaNs found by safe_merge, or an adapter type without merging
        raise ConversionError(f"--merge-lora {adapter_dir}: merging failed: {err}") from err
    state = {k: v.detach() for k, v in merged.state_dict().items()}
    if adapted_embedding is not None:
        # PEFT merges into the shared embedding/lm_head matrix once per adapted module (twice with tied adapters);
        # the tied checkpoint holds the adapted embedding, once.
        state.pop("lm_head.weight", None)
        state["model.embed_tokens.weight"] = adapted_embedding.to(state["model.embed_tokens.weight"].dtype)
    state = strip_tied_head(state)
    check = compare_logits(hf_logits(build_model(config, state), tokens), reference, rtol=CHECK_RTOL)
    if not check.passed:
        raise ConversionError(
            f"--merge-lora {adapter_dir}: the merged weights do not compute the PEFT model with the adapter (max abs "
            f"logit diff {check.max_abs_diff:.3e} on a {seq_len}-token prompt, tolerance {check.tolerance:.3e}); "
            "nothing was written"
        )
    return state

"""Auto* registration of VaultGemma, decided explicitly (transformers 5 already ships a built-in "vaultgemma").

Policy (also in docs/source/en/model_doc/vaultgemma.md):

* Importing our model classes (`vaultgemma_hf.models`; `import vaultgemma_hf` does it at once only where
  deferring it could change a lookup, see `vaultgemma_hf/__init__.py`) always maps *our* config class to our
  model classes in `AutoModel` and `AutoModelForCausalLM` (so
  `AutoModelForCausalLM.from_config(vaultgemma_hf.VaultGemmaConfig(...))` builds ours), and makes checkpoints
  saved by our classes carry an `auto_map`, so they load with `trust_remote_code=True` where this package is not
  installed.
* If transformers has **no** built-in "vaultgemma", the import also registers "vaultgemma" in `AutoConfig`, so
  `AutoConfig` / `AutoModel` / `AutoModelForCausalLM.from_pretrained(path)` resolve to our classes.
* If transformers **has** a built-in "vaultgemma", the import leaves `AutoConfig` alone: `from_pretrained(path)`
  keeps resolving to transformers' classes (numerically identical to ours; tested). Nothing global changes
  silently. To make the Auto classes use ours instead, call `register_auto_classes(override=True)` or set
  `VAULTGEMMA_HF_OVERRIDE_AUTO=1` before the import; both log a warning that says so.
* `AutoModelForSeq2SeqLM` with a VaultGemma config raises an error that points to `AutoModelForCausalLM`
  (VaultGemma is decoder-only; the upstream docs page showed the seq2seq class by mistake). Before, this call
  failed with a generic "unrecognized configuration" error; no working call changes. transformers 5.17-5.18 ignore
  registrations for their own config classes, so there the built-in config keeps the generic error.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedConfig
from transformers.utils import logging

from .._auto_env import OVERRIDE_ENV, override_requested
from .vaultgemma import VaultGemmaConfig, VaultGemmaForCausalLM, VaultGemmaModel

logger = logging.get_logger(__name__)

MODEL_TYPE = "vaultgemma"


def builtin_vaultgemma_config_class() -> type[PreTrainedConfig] | None:
    """Returns transformers' own config class registered for "vaultgemma", or None when there is none."""
    try:
        config_class = type(AutoConfig.for_model(MODEL_TYPE))
    except (ValueError, KeyError):
        return None
    return None if config_class is VaultGemmaConfig else config_class


def _seq2seq_pointer(config_class: type[PreTrainedConfig]) -> type:
    """A stand-in registered in AutoModelForSeq2SeqLM whose constructors explain the right call."""

    def _refuse(*args, **kwargs):
        raise ValueError(
            "VaultGemma is a decoder-only causal language model, not a sequence-to-sequence model: use "
            "AutoModelForCausalLM.from_pretrained(...) and pipeline('text-generation', ...). The released checkpoint "
            "is pretrained only (no chat template): pass plain text prompts."
        )

    return type(
        f"{config_class.__name__}DecoderOnlyPointer",
        (),
        {
            "config_class": config_class,
            **{name: classmethod(_refuse) for name in ("from_pretrained", "from_config", "_from_config")},
        },
    )


def register_auto_classes(override: bool | None = None) -> str:
    """Registers VaultGemma with the Auto classes following the module's policy.

    Args:
        override: Make `AutoConfig` resolve "vaultgemma" to our classes even when transformers has a built-in one.
            Defaults to the environment variable `VAULTGEMMA_HF_OVERRIDE_AUTO` (1/true/yes).

    Returns:
        "vaultgemma_hf" if `AutoConfig` now resolves "vaultgemma" to our classes, "transformers" otherwise.
    """
    if override is None:
        override = override_requested()
    builtin = builtin_vaultgemma_config_class()

    VaultGemmaConfig.register_for_auto_class()
    VaultGemmaModel.register_for_auto_class("AutoModel")
    VaultGemmaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    AutoModel.register(VaultGemmaConfig, VaultGemmaModel, exist_ok=True)
    AutoModelForCausalLM.register(VaultGemmaConfig, VaultGemmaForCausalLM, exist_ok=True)
    for config_class in (VaultGemmaConfig, builtin):
        if config_class is not None:
            AutoModelForSeq2SeqLM.register(config_class, _seq2seq_pointer(config_class), exist_ok=True)

    if builtin is None:
        AutoConfig.register(MODEL_TYPE, VaultGemmaConfig, exist_ok=True)
        logger.info("vaultgemma_hf: transformers has no built-in VaultGemma; Auto classes now use vaultgemma_hf.")
        return "vaultgemma_hf"
    if override:
        AutoConfig.register(MODEL_TYPE, VaultGemmaConfig, exist_ok=True)
        logger.warning(
            "vaultgemma_hf: AutoConfig/AutoModel/AutoModelForCausalLM now resolve 'vaultgemma' to vaultgemma_hf's "
            "classes instead of transformers' built-in ones (override requested)."
        )
        return "vaultgemma_hf"
    logger.info(
        "vaultgemma_hf: transformers ships a built-in VaultGemma; Auto classes keep resolving 'vaultgemma' to it. "
        f"Set {OVERRIDE_ENV}=1 or call vaultgemma_hf.register_auto_classes(override=True) to use ours."
    )
    return "transformers"

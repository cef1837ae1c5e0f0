"""vaultgemma-hf: VaultGemma as a first-class transformers model, with DP-SGD continued pretraining.

VaultGemma is registered with transformers' Auto classes (policy in `vaultgemma_hf.models.auto`) whenever the
model classes are imported. `import vaultgemma_hf` itself stays light (no torch import, so `vaultgemma-hf plan`
or `env` start in a second) when that changes nothing: when transformers is not imported yet, ships its own
"vaultgemma" and no override is asked for, every Auto lookup resolves the same with or without our registration
until one of our classes is imported, and importing any of them (or reading `AUTO_CLASSES_RESOLVE_TO`)
registers. In every other case (override requested, transformers without a built-in, or transformers already
imported) the import registers at once. All names below are imported on first access.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

from ._auto_env import OVERRIDE_ENV as _OVERRIDE_ENV  # noqa: F401  (the switch, importable without torch)
from ._auto_env import override_requested as _override_requested

__version__ = "0.1.0.dev0"


def _registration_can_wait() -> bool:
    """True when deferring the Auto registration to the first import of our model classes changes no lookup."""
    if _override_requested() or "transformers" in sys.modules:
        return False
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isfile(os.path.join(loc, "models", "vaultgemma", "__init__.py")) for loc in locations)


if not _registration_can_wait():
    importlib.import_module("vaultgemma_hf.models")  # registers (see vaultgemma_hf/models/__init__.py)

# name -> module that defines it; imported on first access.
_LAZY = {
    "AUTO_CLASSES_RESOLVE_TO": "vaultgemma_hf.models",
    "VaultGemmaConfig": "vaultgemma_hf.models",
    "VaultGemmaForCausalLM": "vaultgemma_hf.models",
    "VaultGemmaModel": "vaultgemma_hf.models",
    "VaultGemmaPreTrainedModel": "vaultgemma_hf.models",
    "register_auto_classes": "vaultgemma_hf.models.auto",
    "DPTrainer": "vaultgemma_hf.trainer",
    "DPTrainingArguments": "vaultgemma_hf.trainer",
    "DPGradientEngine": "vaultgemma_hf.dp.engine",
    "UnsupportedModuleError": "vaultgemma_hf.dp.engine",
    "PrivacyAccountant": "vaultgemma_hf.dp.accounting",
    "compute_epsilon": "vaultgemma_hf.dp.accounting",
    "calibrate_noise_multiplier": "vaultgemma_hf.dp.accounting",
    "pack_documents": "vaultgemma_hf.data",
    "PackedDataset": "vaultgemma_hf.data",
    "DataCollatorForPackedSequences": "vaultgemma_hf.data",
    "convert_checkpoint": "vaultgemma_hf.conversion",
    "merge_lora": "vaultgemma_hf.conversion",
    "ConversionError": "vaultgemma_hf.conversion",
    "CompiledGreedyDecoder": "vaultgemma_hf.generation",
    "make_canaries": "vaultgemma_hf.privacy_eval",
    "append_canaries": "vaultgemma_hf.privacy_eval",
    "run_privacy_audit": "vaultgemma_hf.privacy_eval",
}

__all__ = [
    "AUTO_CLASSES_RESOLVE_TO",
    "VaultGemmaConfig",
    "VaultGemmaForCausalLM",
    "VaultGemmaModel",
    "VaultGemmaPreTrainedModel",
    "register_auto_classes",
    "CompiledGreedyDecoder",
    "ConversionError",
    "DPGradientEngine",
    "DPTrainer",
    "DPTrainingArguments",
    "DataCollatorForPackedSequences",
    "PackedDataset",
    "PrivacyAccountant",
    "UnsupportedModuleError",
    "append_canaries",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "convert_checkpoint",
    "make_canaries",
    "merge_lora",
    "pack_documents",
    "run_privacy_audit",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaultgemma_hf' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .conversion import ConversionError, convert_checkpoint, merge_lora
    from .data import DataCollatorForPackedSequences, PackedDataset, pack_documents
    from .dp.accounting import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
    from .dp.engine import DPGradientEngine, UnsupportedModuleError
    from .generation import CompiledGreedyDecoder
    from .models import AUTO_CLASSES_RESOLVE_TO
    from .models.auto import register_auto_classes
    from .models.vaultgemma import VaultGemmaConfig, VaultGemmaForCausalLM, VaultGemmaModel, VaultGemmaPreTrainedModel
    from .privacy_eval import append_canaries, make_canaries, run_privacy_audit
    from .trainer import DPTrainer, DPTrainingArguments

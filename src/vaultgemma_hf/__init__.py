"""vaultgemma-hf: VaultGemma as a first-class transformers model, with DP-SGD continued pretraining.

Importing the package registers VaultGemma with transformers' Auto classes (see `vaultgemma_hf.models.auto` for
the exact policy). Training, DP and planning names are imported lazily so that `import vaultgemma_hf` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .models.auto import register_auto_classes
from .models.vaultgemma import VaultGemmaConfig, VaultGemmaForCausalLM, VaultGemmaModel, VaultGemmaPreTrainedModel

__version__ = "0.1.0.dev0"

AUTO_CLASSES_RESOLVE_TO = register_auto_classes()

# name -> module that defines it; imported on first access.
_LAZY = {
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
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "convert_checkpoint",
    "merge_lora",
    "pack_documents",
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
    from .trainer import DPTrainer, DPTrainingArguments

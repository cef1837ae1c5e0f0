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
    "PrivacyAccountant": "vaultgemma_hf.dp.accounting",
    "compute_epsilon": "vaultgemma_hf.dp.accounting",
    "calibrate_noise_multiplier": "vaultgemma_hf.dp.accounting",
}

__all__ = [
    "AUTO_CLASSES_RESOLVE_TO",
    "VaultGemmaConfig",
    "VaultGemmaForCausalLM",
    "VaultGemmaModel",
    "VaultGemmaPreTrainedModel",
    "register_auto_classes",
    "DPTrainer",
    "DPTrainingArguments",
    "DPGradientEngine",
    "PrivacyAccountant",
    "compute_epsilon",
    "calibrate_noise_multiplier",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaultgemma_hf' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .dp.accounting import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
    from .dp.engine import DPGradientEngine
    from .trainer import DPTrainer, DPTrainingArguments

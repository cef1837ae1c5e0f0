"""VaultGemma model classes (self-contained: no DP or Trainer code here)."""

from .configuration_vaultgemma import VaultGemmaConfig
from .modeling_vaultgemma import VaultGemmaForCausalLM, VaultGemmaModel, VaultGemmaPreTrainedModel

__all__ = ["VaultGemmaConfig", "VaultGemmaForCausalLM", "VaultGemmaModel", "VaultGemmaPreTrainedModel"]

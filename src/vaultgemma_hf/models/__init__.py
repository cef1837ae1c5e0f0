"""Model classes. Importing this package registers VaultGemma with transformers' Auto classes.

The policy is in :mod:`vaultgemma_hf.models.auto`; `AUTO_CLASSES_RESOLVE_TO` says whether `AutoConfig` resolves
"vaultgemma" to our classes ("vaultgemma_hf") or to transformers' built-in ones ("transformers"). The names are
re-exported by the top-level package (`vaultgemma_hf.VaultGemmaConfig`, ...).
"""

from .auto import register_auto_classes
from .vaultgemma import VaultGemmaConfig, VaultGemmaForCausalLM, VaultGemmaModel, VaultGemmaPreTrainedModel  # noqa: F401

AUTO_CLASSES_RESOLVE_TO = register_auto_classes()

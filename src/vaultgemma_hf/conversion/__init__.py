"""Weight conversion between the JAX/Flax "gemma library" layout (Orbax, .npz) and HF safetensors.

Quick use::

    from vaultgemma_hf.conversion import convert

    report = convert("gemma_ckpt/", "vaultgemma-hf/", dtype="bf16", verify=True)
    print(report.summary())

The pieces are usable on their own: `jax_to_hf` / `hf_to_jax` (pure mappings over tensor dicts), `infer_config`
(config from shapes, presets), the readers/writers in `io_jax` / `io_hf`, `merge_lora` and `reference_forward`.
"""

from .config import PRESETS, infer_config, make_config
from .errors import ConversionError, MissingDependencyError
from .layout import JaxLayout, JaxToHfResult, hf_to_jax, jax_to_hf
from .lora import merge_lora
from .pipeline import ConversionReport, VerificationError, convert, detect_format
from .reference_forward import reference_forward
from .verify import VerifyResult, verify_against_reference

convert_checkpoint = convert
"""Alias of `convert` under a name that is unambiguous at the package's top level."""

__all__ = [
    "PRESETS",
    "ConversionError",
    "ConversionReport",
    "JaxLayout",
    "JaxToHfResult",
    "MissingDependencyError",
    "VerificationError",
    "VerifyResult",
    "convert",
    "convert_checkpoint",
    "detect_format",
    "hf_to_jax",
    "infer_config",
    "jax_to_hf",
    "make_config",
    "merge_lora",
    "reference_forward",
    "verify_against_reference",
]

"""Tensor helpers: numpy <-> torch without losing bfloat16, dtype parsing and casting.

numpy has no native bfloat16. Arrays coming from JAX/Orbax use `ml_dtypes.bfloat16`; `.npz` files store such
arrays as raw 2-byte records (`|V2`). Both are moved to and from torch through their bit patterns (int16 views),
so no value is ever rounded on the way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .errors import ConversionError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Output dtypes selectable on the command line (`--dtype`)."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Maps `"fp32"`/`"bf16"` (or `"float32"`, `"bfloat16"`, a `torch.dtype`) to a torch dtype; `"auto"`/None -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key == "auto":
        return None
    aliases = {"float32": "fp32", "bfloat16": "bf16", "torch.float32": "fp32", "torch.bfloat16": "bf16"}
    key = aliases.get(key, key)
    if key not in DTYPES:
        raise ConversionError(f"unsupported dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def _is_bfloat16_numpy(array: np.ndarray) -> bool:
    return array.dtype.name == "bfloat16" or array.dtype.str == "|V2"


def numpy_to_torch(array) -> torch.Tensor:
    """Converts a numpy (or numpy-convertible, e.g. JAX) array to a CPU torch tensor, bit for bit.

    Args:
        array: A numpy array, possibly of dtype `ml_dtypes.bfloat16` or raw `|V2` (bfloat16 from a `.npz` file).

    Returns:
        A tensor with the same shape, dtype and bits.
    """
    array = np.asarray(array)
    if _is_bfloat16_numpy(array):
        bits = np.ascontiguousarray(array).view(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    if array.dtype.kind not in "fiub":
        raise ConversionError(f"unsupported array dtype {array.dtype} (expected floating point)")
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def torch_to_numpy(tensor: torch.Tensor, *, bfloat16: str = "ml_dtypes") -> np.ndarray:
    """Converts a torch tensor to numpy, bit for bit.

    Args:
        tensor: Any CPU tensor.
        bfloat16: How to represent bfloat16: `"ml_dtypes"` (a real `ml_dtypes.bfloat16` array, needed for Orbax)
            or `"void"` (raw `|V2` records, what numpy writes into `.npz` for bfloat16 anyway; needs no extra
            package).

    Returns:
        A numpy array that owns or views the tensor's memory.
    """
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    bits = tensor.view(torch.int16).numpy()
    if bfloat16 == "void":
        return bits.view("V2")
    try:
        import ml_dtypes
    except ImportError as err:  # pragma: no cover - ml_dtypes comes with jax
        raise ConversionError("bfloat16 arrays for JAX need the `ml_dtypes` package (installed with jax)") from err
    return bits.view(ml_dtypes.bfloat16)


def to_float64_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Returns a float64 numpy copy of a tensor of any floating dtype (exact: every fp32/bf16 value is a float64)."""
    return tensor.detach().cpu().to(torch.float64).numpy()


def cast_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Casts every floating tensor of a state dict to `dtype` (None keeps each tensor's dtype)."""
    if dtype is None:
        return dict(state)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def dominant_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype holding most parameters (what a config's `dtype` should say)."""
    counts: dict[torch.dtype, int] = {}
    for value in state.values():
        counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")

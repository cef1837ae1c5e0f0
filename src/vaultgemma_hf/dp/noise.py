"""Gaussian noise for DP-SGD, always drawn in float32 (or wider), never in the model's compute dtype."""

from __future__ import annotations

import secrets

import torch

__all__ = ["add_gaussian_noise", "gaussian_noise_like", "os_seeded_generator"]


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh `torch.Generator` on ``device`` seeded with 63 bits of OS entropy (``secrets``)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(secrets.randbits(63))
    return generator


def _check(dtype: torch.dtype, std: float) -> None:
    if not std >= 0.0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        raise ValueError(f"DP noise must be drawn and added in float32 or wider, not {dtype}: accumulate in float32")


def gaussian_noise_like(tensor: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples ``N(0, std^2)`` with the shape and device of ``tensor`` in ``promote(tensor.dtype, float32)``.

    The noise is drawn on the generator's device (e.g. a CPU generator for a CUDA tensor) and then moved.
    """
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    _check(dtype, std)
    device = generator.device if generator is not None else tensor.device
    return torch.normal(0.0, std, tensor.shape, generator=generator, device=device, dtype=dtype).to(tensor.device)


def add_gaussian_noise(tensor: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns ``tensor + N(0, std^2)`` (float32 or wider ``tensor``), drawn in one pass when possible.

    Uses ``torch.normal(mean=tensor, std)`` (one read, one write) when the generator lives on the tensor's device;
    otherwise draws on the generator's device and adds. The input is left unchanged in the first case and updated
    in place in the second: always use the return value.
    """
    _check(tensor.dtype, std)
    if std == 0.0:
        return tensor
    if generator is None or generator.device == tensor.device:
        return torch.normal(tensor, std, generator=generator)
    return tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype).to(tensor.device), alpha=std)

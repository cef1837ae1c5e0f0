"""Errors raised by the conversion tools."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked (bad key, bad shape, contradicting option...).

    The message always names what is wrong (the key, the option or the file) and, where there is one, the way out.
    """


class MissingDependencyError(ImportError):
    """An optional dependency needed for one format is not installed."""


ORBAX_HINT = (
    "reading or writing Orbax checkpoints needs the optional `orbax-checkpoint` package: "
    "pip install 'vaultgemma-hf[convert]' (the .npz and safetensors paths work without it)"
)

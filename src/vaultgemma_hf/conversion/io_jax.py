"""Reading and writing JAX-layout parameters: Orbax checkpoint directories and flat `.npz` files.

Orbax is optional (`pip install 'vaultgemma-hf[convert]'`) and imported only when an Orbax checkpoint is read or
written. `.npz` files hold the flattened tree with '/'-joined keys (e.g. `transformer/layer_0/attn/q_einsum/w`);
bfloat16 arrays are stored as raw 2-byte records (`|V2`), which is what numpy itself writes for
`ml_dtypes.bfloat16`, and read back as bfloat16.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from .errors import ORBAX_HINT, ConversionError, MissingDependencyError
from .layout import flatten_tree, normalize_jax_keys, to_released_tree, training_state_roots
from .tensors import numpy_to_torch, torch_to_numpy

logger = logging.get_logger(__name__)

ORBAX_MARKERS = (
    "_METADATA",
    "_CHECKPOINT_METADATA",
    "manifest.ocdbt",
    "checkpoint",
    "_sharding",
    "commit_success.txt",
)
"""Files found at the top of an Orbax (PyTree) checkpoint directory."""


def import_orbax():
    """Imports `orbax.checkpoint`, or raises `MissingDependencyError` saying how to install it."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise MissingDependencyError(ORBAX_HINT) from err
    return ocp


def is_orbax_dir(path: str | os.PathLike) -> bool:
    """True for a directory that looks like an Orbax PyTree checkpoint."""
    path = Path(path)
    return path.is_dir() and any((path / marker).exists() for marker in ORBAX_MARKERS)


STEP_ITEM = "default"
"""The item directory inside a `CheckpointManager` / Kauldron step directory."""


def orbax_item_dir(path: str | os.PathLike) -> Path:
    """The directory holding the PyTree: `path` itself, or `path/default` for a step directory.

    A `CheckpointManager` (and Kauldron's trainer) writes each step as `<step>/_CHECKPOINT_METADATA` plus one
    directory per item, `default` for a single item; the gemma library's `gm.ckpts.load_params` then reads
    `<step>/default` (`_get_metadata_and_path` in `gemma/gm/ckpts/_checkpoint.py`). Same here.
    """
    path = Path(path)
    item = path / STEP_ITEM
    if (
        (path / "_CHECKPOINT_METADATA").is_file()
        and not (path / "_METADATA").exists()
        and item.is_dir()
        and any((item / marker).exists() for marker in ORBAX_MARKERS)
    ):
        return item
    return path


def is_npz(path: str | os.PathLike) -> bool:
    """True for an existing `.npz` (zip) file."""
    path = Path(path)
    return path.is_file() and path.suffix == ".npz" and zipfile.is_zipfile(path)


# ----------------------------------------------------------------------------------------------------------------
# .npz


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a flat `.npz` of the parameter tree (no pickle) into `{normalised key: tensor}`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {key: numpy_to_torch(data[key]) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConversionError(f"cannot read {path} as a .npz file: {err}") from err
    return normalize_jax_keys(flat)


def write_npz(params: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Writes `{key: tensor}` to an uncompressed `.npz` at exactly `path` (numpy would otherwise add `.npz`)."""
    arrays = {key: torch_to_numpy(value, bfloat16="void") for key, value in params.items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# ----------------------------------------------------------------------------------------------------------------
# Orbax


def _metadata_tree(checkpointer, path: Path):
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)  # orbax >= 0.9 wraps the tree in StepMetadata
    return getattr(metadata, "tree", metadata)


def _restore_params_only(ocp, checkpointer, path: Path, meta: Mapping, restore_args) -> dict:
    """Restores the `params` subtree of a checkpoint (`meta` = `{'params': metadata}`) and nothing else."""
    import jax

    try:
        args = ocp.args.PyTreeRestore(item=meta, restore_args=restore_args, partial_restore=True)
    except TypeError:  # an Orbax without partial restore: restore everything, keep the params
        full = _metadata_tree(checkpointer, path)
        full_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), full)
        return {"params": checkpointer.restore(path, restore_args=full_args)["params"]}
    return checkpointer.restore(path, args=args)


def read_orbax(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Restores an Orbax PyTree checkpoint as host numpy arrays and returns `{normalised key: tensor}`.

    Accepted trees: nested with a `transformer` level (`{'transformer': {'layer_0': ...}}`), nested without it
    (`{'embedder', 'layer_0', ..., 'final_norm'}`, what `gm.ckpts.save_params` writes), the flat tree of the
    released gemma checkpoints (`{'transformer/layer_0/attn/q_einsum': {'w': ...}}`, what `write_orbax` writes),
    its stacked variant (`transformer/stacked_layers/attention_type_{p}/...`) and a Kauldron trainer state
    (`{'params', 'opt_state', 'step', 'collections'}`: only `params` is restored). `path` may also be a
    `CheckpointManager` step directory (`<step>/_CHECKPOINT_METADATA` + `<step>/default/`): its `default` item is
    read, as `gm.ckpts.load_params` does.
    """
    ocp = import_orbax()
    import jax

    path = Path(path).absolute()
    item = orbax_item_dir(path)
    if item != path:
        logger.info(f"{path} is a checkpoint step directory: reading its item {item.name!r}")
        path = item
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        meta = _metadata_tree(checkpointer, path)
        ignored = training_state_roots(meta) if isinstance(meta, Mapping) else None
        if ignored:  # a trainer checkpoint: restore its params only, not the (larger) optimizer state
            logger.warning(
                f"{path}: trainer checkpoint, converting its 'params' only; ignored {', '.join(ignored)} "
                "(training state)"
            )
            meta = {"params": meta["params"]}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        if ignored:
            tree = _restore_params_only(ocp, checkpointer, path, meta, restore_args)
        else:
            tree = checkpointer.restore(path, restore_args=restore_args)
    except Exception as err:  # orbax raises many types; report them as one clear error
        raise ConversionError(
            f"cannot restore {path} as an Orbax PyTree checkpoint ({type(err).__name__}: {err}). If this is a "
            "CheckpointManager directory, point to one step, e.g. <dir>/<step> (or its item, <dir>/<step>/default)"
        ) from err
    if not isinstance(tree, Mapping):
        raise ConversionError(f"{path}: the checkpoint holds a {type(tree).__name__}, not a parameter dict")
    flat = flatten_tree(tree)
    return normalize_jax_keys({key: numpy_to_torch(value) for key, value in flat.items()})


def write_orbax(params: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Saves canonical JAX-layout params as an Orbax PyTree checkpoint at `path` (which must not exist yet).

    The tree is the FLAT one of the released gemma checkpoints (`to_released_tree`:
    `{'transformer/layer_0/attn/qkv_einsum': {'w': ...}, 'transformer/layer_0/mlp/gating_einsum': {'w': ...}}`),
    which both `gm.ckpts.load_params` (with or without `params=`) and the legacy
    `gemma.params.load_and_format_params` read.
    """
    ocp = import_orbax()
    tree = to_released_tree({key: torch_to_numpy(value) for key, value in params.items()})
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(Path(path).absolute(), tree)
    wait = getattr(checkpointer, "wait_until_finished", None)
    if wait is not None:
        wait()


def read_jax(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Reads a JAX-layout checkpoint (Orbax directory or `.npz`); returns the params and `"orbax"`/`"npz"`."""
    if is_npz(path):
        return read_npz(path), "npz"
    if is_orbax_dir(path):
        return read_orbax(path), "orbax"
    raise ConversionError(f"{path} is neither a .npz file nor an Orbax checkpoint directory")


def write_jax(params: Mapping[str, torch.Tensor], path: str | os.PathLike, fmt: str) -> None:
    """Writes JAX-layout params as `fmt` (`"orbax"` or `"npz"`) at `path`."""
    if fmt == "npz":
        write_npz(params, path)
    elif fmt == "orbax":
        write_orbax(params, path)
    else:
        raise ConversionError(f"unknown JAX output format {fmt!r} (orbax or npz)")

"""Reading and writing HF checkpoint directories (safetensors only, sharded with an index above a size)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import model_classes
from .errors import ConversionError
from .files import read_json_object
from .layout import Dims, JaxLayout, expected_hf_shapes
from .tensors import dominant_dtype, dtype_name

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = "model-{:05d}-of-{:05d}.safetensors"
JAX_LAYOUT_NAME = "jax_layout.json"
"""Written beside HF weights converted from JAX: the layout choices needed to go back bit for bit."""
JAX_PADDING_NAME = "jax_embedding_padding.safetensors"
"""The embedding rows beyond `vocab_size` of a padded JAX table, when they are not all zero."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_SHARD_SIZE = "5GB"


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory with `config.json` and safetensors weights (single file or index)."""
    path = Path(path)
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and ((path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file())
    )


def pickle_only_weights(path: str | os.PathLike) -> list[str]:
    """Names of pickle-based weight files in a directory without safetensors (which this package never loads)."""
    path = Path(path)
    if not path.is_dir() or (path / WEIGHTS_NAME).exists() or (path / INDEX_NAME).exists():
        return []
    return sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})


def parse_size(size: str | int) -> int:
    """Parses a size like `"5GB"`, `"500MB"`, `"2GiB"` or a byte count (GB/MB/KB are decimal, GiB/MiB binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"cannot read {size!r} as a size (e.g. 5GB, 500MB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    value = int(number * scale[unit])
    if value <= 0:
        raise ConversionError(f"shard size must be positive, got {size!r}")
    return value


@dataclass
class HfCheckpoint:
    """An HF VaultGemma checkpoint read from disk.

    Attributes:
        state_dict: Parameters (as stored; `lm_head.weight` included if the files have it).
        config: The `VaultGemmaConfig`.
        path: The directory.
        jax_layout: The JAX layout recorded by a JAX -> HF conversion (None if absent).
        padding_rows: Recorded padded embedding rows (None if absent).
        generation_config: The `generation_config.json` contents (None if absent).
        tokenizer_files: Tokenizer files present in the directory.
    """

    state_dict: dict[str, torch.Tensor]
    config: Any
    path: Path
    jax_layout: JaxLayout | None = None
    padding_rows: torch.Tensor | None = None
    generation_config: dict[str, Any] | None = None
    tokenizer_files: list[Path] = field(default_factory=list)


def _load_safetensors(file: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in (keys if keys is not None else f.keys())}
    except Exception as err:  # safetensors raises its own error types
        raise ConversionError(f"cannot read {file}: {err}") from err


def read_hf_config(path: str | os.PathLike) -> Any:
    """Reads the `VaultGemmaConfig` of an HF VaultGemma directory (without its weights).

    Raises:
        ConversionError: naming `config.json` when it is not JSON, not a VaultGemma config or invalid.
    """
    path = Path(path)
    config_dict = read_json_object(path / "config.json")
    if config_dict.get("model_type") != "vaultgemma":
        raise ConversionError(
            f"{path / 'config.json'}: model_type is {config_dict.get('model_type')!r}, not 'vaultgemma'"
        )
    config_class, _ = model_classes()
    try:
        return config_class.from_pretrained(str(path))
    except Exception as err:
        raise ConversionError(f"{path / 'config.json'}: not a valid VaultGemma config: {err}") from err


def read_hf(path: str | os.PathLike, *, progress: bool = False) -> HfCheckpoint:
    """Reads config, weights (safetensors only) and conversion side files of an HF VaultGemma directory."""
    path = Path(path)
    if not is_hf_dir(path):
        pickles = pickle_only_weights(path)
        if pickles:
            raise ConversionError(
                f"{path} has only pickle weights ({', '.join(pickles)}); this tool reads safetensors only "
                "(re-save them with safetensors first)"
            )
        raise ConversionError(f"{path} is not an HF checkpoint directory (config.json + {WEIGHTS_NAME} or index)")
    config = read_hf_config(path)

    if (path / INDEX_NAME).is_file():
        weight_map = read_json_object(path / INDEX_NAME).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConversionError(f"{path / INDEX_NAME}: weight_map must map parameter names to file names")
        if not weight_map:
            raise ConversionError(f"{path / INDEX_NAME} has an empty weight_map")
        by_file: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            by_file.setdefault(file, []).append(key)
        missing = sorted(file for file in by_file if not (path / file).is_file())
        if missing:
            raise ConversionError(f"{path / INDEX_NAME} names missing shard(s): {', '.join(missing)}")
        state: dict[str, torch.Tensor] = {}
        for file, keys in tqdm(by_file.items(), desc="reading shards", disable=not progress):
            state.update(_load_safetensors(path / file, keys))
    else:
        state = _load_safetensors(path / WEIGHTS_NAME)

    checkpoint = HfCheckpoint(state_dict=state, config=config, path=path)
    if (path / JAX_LAYOUT_NAME).is_file():
        layout_file = path / JAX_LAYOUT_NAME
        layout_data = read_json_object(layout_file)
        try:
            checkpoint.jax_layout = JaxLayout.from_dict(layout_data)
        except ConversionError as err:
            raise ConversionError(f"{layout_file}: {err}") from err
    if (path / JAX_PADDING_NAME).is_file():
        padding = _load_safetensors(path / JAX_PADDING_NAME)
        if "padding_rows" not in padding:
            raise ConversionError(
                f"{path / JAX_PADDING_NAME}: no 'padding_rows' tensor (found {sorted(padding) or 'none'})"
            )
        checkpoint.padding_rows = padding["padding_rows"]
    if (path / "generation_config.json").is_file():
        checkpoint.generation_config = read_json_object(path / "generation_config.json")
    checkpoint.tokenizer_files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    return checkpoint


def tokenizer_files_from(spec: str | os.PathLike) -> list[tuple[Path, str]]:
    """Resolves `--tokenizer`: a directory (its tokenizer files) or one file (a SentencePiece `.model` is copied
    as `tokenizer.model`, a `.json` as `tokenizer.json`). Returns `(source, name in the output)` pairs."""
    spec = Path(spec)
    if spec.is_dir():
        files = [(spec / name, name) for name in TOKENIZER_FILES if (spec / name).is_file()]
        if not files:
            raise ConversionError(f"--tokenizer {spec}: no tokenizer files found ({', '.join(TOKENIZER_FILES)})")
        return files
    if spec.is_file():
        if spec.suffix == ".model":
            return [(spec, "tokenizer.model")]
        if spec.suffix == ".json":
            return [(spec, "tokenizer.json")]
        raise ConversionError(f"--tokenizer {spec}: expected a directory, a SentencePiece .model or a tokenizer.json")
    raise ConversionError(f"--tokenizer {spec}: no such file or directory")


def _ordered_keys(state: Mapping[str, torch.Tensor], config: Any) -> list[str]:
    expected = list(expected_hf_shapes(Dims.from_config(config)))
    return [k for k in expected if k in state] + sorted(k for k in state if k not in set(expected))


def plan_shards(state: Mapping[str, torch.Tensor], keys: Sequence[str], max_bytes: int) -> list[list[str]]:
    """Groups keys, in order, into shards of at most `max_bytes` (a single larger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_config_like_model(path: Path, config: Any) -> list[str]:
    """Writes `config.json` (and, for model classes registered for remote code, their source files and `auto_map`)
    exactly as `VaultGemmaForCausalLM.save_pretrained` would. Returns the names of the files written."""
    from accelerate import init_empty_weights

    before = set(os.listdir(path))
    _, model_class = model_classes()
    if getattr(model_class, "_auto_class", None) is not None:
        from transformers.dynamic_module_utils import custom_object_save

        with init_empty_weights():
            model = model_class(config)
        custom_object_save(model, str(path), config=config)
    config.save_pretrained(str(path))
    return sorted(set(os.listdir(path)) - before)


def _default_permissions(path: Path) -> None:
    """Gives written files the usual permissions (safetensors writes 0600 files through a temporary file)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in path.iterdir():
        if file.is_file():
            os.chmod(file, 0o666 & ~umask)


def write_hf(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: Any,
    *,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    generation_config: Mapping[str, Any] | None = None,
    tokenizer_files: Sequence[tuple[Path, str]] = (),
    jax_layout: JaxLayout | None = None,
    padding_rows: torch.Tensor | None = None,
    progress: bool = False,
) -> list[str]:
    """Writes an HF checkpoint directory at `path` (which must not exist; use `atomic_output`).

    Args:
        path: Output directory.
        state: `model.*` parameters (`lm_head.weight` is tied and not written).
        config: The `VaultGemmaConfig`; its `dtype` is set from the weights.
        shard_size: Above this total size the weights are split into `model-0000i-of-0000n.safetensors` files
            with a `model.safetensors.index.json`.
        generation_config: Contents of `generation_config.json`; derived from the config when None.
        tokenizer_files: `(source file, name)` pairs to copy.
        jax_layout: JAX layout to record in `jax_layout.json` (for a bit-exact way back).
        padding_rows: Sliced-off embedding rows to keep in `jax_embedding_padding.safetensors` (skipped if zero).
        progress: Show a progress bar.

    Returns:
        Names of the files written.
    """
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=False, exist_ok=False)
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    keys = _ordered_keys(state, config)
    max_bytes = parse_size(shard_size)
    shards = plan_shards(state, keys, max_bytes)
    total = sum(v.numel() * v.element_size() for v in state.values())
    written: list[str] = []
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors", disable=not progress)
    weight_map: dict[str, str] = {}
    for i, shard_keys in enumerate(shards):
        name = WEIGHTS_NAME if len(shards) == 1 else SHARD_PATTERN.format(i + 1, len(shards))
        tensors = {k: state[k].detach().cpu().contiguous() for k in shard_keys}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, name))
        written.append(name)
        bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(path / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        written.append(INDEX_NAME)

    config.dtype = dtype_name(dominant_dtype(state))
    config.architectures = ["VaultGemmaForCausalLM"]
    written += save_config_like_model(path, config)
    if generation_config is not None:
        with open(path / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump(dict(generation_config), f, indent=2, sort_keys=True)
            f.write("\n")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(str(path))
    written.append("generation_config.json")
    for source, name in tokenizer_files:
        shutil.copyfile(source, path / name)
        written.append(name)
    if jax_layout is not None:
        with open(path / JAX_LAYOUT_NAME, "w", encoding="utf-8") as f:
            json.dump(jax_layout.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        written.append(JAX_LAYOUT_NAME)
    if padding_rows is not None and bool(padding_rows.ne(0).any()):
        save_file({"padding_rows": padding_rows.contiguous()}, str(path / JAX_PADDING_NAME), metadata={"format": "pt"})
        written.append(JAX_PADDING_NAME)
    _default_permissions(path)
    return written

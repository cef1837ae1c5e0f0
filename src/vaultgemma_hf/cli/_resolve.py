"""`vaultgemma-hf run`'s checks before anything is loaded: flag ranges, device, output path, model location."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from ._io import UsageError

DEVICE_CHOICES = "cpu, cuda, cuda:N, N (GPU index), -1 (cpu), mps, xpu, xpu:N or auto"
_SAMPLING_FLAGS = (("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"))
_REVISION_PATTERN = re.compile(r"[\w.\-/]+")  # a branch, tag or commit hash after "owner/name@"


def _check_number(flag: str, value: float | None, valid: bool, requirement: str) -> None:
    if value is not None and not valid:
        raise UsageError(f"{flag} {value}: {requirement}")


def _validate_generation_flags(args: argparse.Namespace) -> None:
    """Checks the numeric flags up front, so that a typo fails before the model is loaded."""
    positive_int = "must be a positive integer."
    _check_number("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, positive_int)
    _check_number("--batch-size", args.batch_size, args.batch_size >= 1, positive_int)
    if args.num_beams is not None:
        _check_number("--num-beams", args.num_beams, args.num_beams >= 1, positive_int)
    if args.top_k is not None:
        _check_number("--top-k", args.top_k, args.top_k >= 0, "must be 0 (no top-k filtering) or a positive integer.")
    if args.top_p is not None:
        _check_number("--top-p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1].")
    if args.temperature is not None:
        valid = math.isfinite(args.temperature) and args.temperature > 0
        _check_number("--temperature", args.temperature, valid, "must be a positive number (greedy: no --do-sample).")
    if args.repetition_penalty is not None:
        valid = math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0
        _check_number("--repetition-penalty", args.repetition_penalty, valid, "must be a positive number (1.0: none).")
    sampling_only = [flag for flag, name in _SAMPLING_FLAGS if getattr(args, name) is not None]
    if sampling_only and not args.do_sample:
        # generate() would ignore them with a warning and decode greedily
        raise UsageError(f"{', '.join(sampling_only)}: only used when sampling; add --do-sample (or drop them).")


def _resolve_device(spec: str) -> str | None:
    """Parses `--device` and checks that the device exists here.

    Args:
        spec: The `--device` value.

    Returns:
        A torch device string, or None for "auto" (placement left to `device_map="auto"`).

    Raises:
        UsageError: The device is malformed, unsupported or not available on this machine.
    """
    if spec == "auto":
        return None
    import torch

    text = "cpu" if spec == "-1" else f"cuda:{spec}" if spec.isdigit() else spec
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec}: not a device; use {DEVICE_CHOICES}.") from None
    if device.type == "cpu":
        return str(device)
    if device.type == "cuda":
        name, available, count = "CUDA", torch.cuda.is_available(), torch.cuda.device_count
    elif device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        name, available = "XPU", xpu is not None and xpu.is_available()
        count = xpu.device_count if xpu is not None else (lambda: 0)
    elif device.type == "mps":
        name, available, count = "MPS", torch.backends.mps.is_available(), lambda: 1
    else:
        raise UsageError(f"--device {spec}: unsupported device type {device.type!r}; use {DEVICE_CHOICES}.")
    if not available:
        raise UsageError(f"--device {spec}: {name} is not available on this machine.")
    if device.index is not None and device.index >= count():
        raise UsageError(f"--device {spec}: no such device; this machine has {count()} {name} device(s).")
    return str(device)


def _check_output_path(output: str | None) -> None:
    """Checks up front that `--output` can be created: not a directory, under a writable directory."""
    if output is None or output == "-":
        return
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"--output {output}: is a directory; give a file path.")
    ancestor = target.parent  # atomic_output creates missing parent directories
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--output {output}: {ancestor} is not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: cannot write in {ancestor}.")


def _is_repo_id(value: str) -> bool:
    """Tells whether `value` reads as a Hub model repo id: `owner/name` or `name`, optionally `@revision`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = value.partition("@")
    if at and (not _REVISION_PATTERN.fullmatch(revision) or ".." in revision):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _resolve_pretrained(flag: str, value: str, need_config: bool) -> str:
    """Resolves `--model`/`--tokenizer` to a local directory, never downloading.

    An existing path is used as it is. Otherwise a Hub repo id (`owner/name[@revision]`) is looked up in the local
    Hugging Face cache only (`snapshot_download(..., local_files_only=True)`, which honours $HF_HUB_CACHE/$HF_HOME).

    Args:
        flag: The flag, for messages ("--model" or "--tokenizer").
        value: Its value.
        need_config: Whether the directory must hold a config.json (a model does, a tokenizer need not).

    Returns:
        The local directory (for a repo id, its snapshot folder in the cache).

    Raises:
        UsageError: Not an existing directory (with a config.json if needed), and not a repo id in the cache.
    """
    kind = "model" if need_config else "tokenizer"
    path = Path(value)
    if path.exists() or not _is_repo_id(value):
        give = f"Give a local {kind} directory or the id of a repo in the local Hugging Face cache"
        give += " (nothing is downloaded)."
        if need_config and not (path / "config.json").is_file():
            raise UsageError(f"{flag} {value}: no config.json there. {give}")
        if not path.is_dir():
            raise UsageError(f"{flag} {value}: {'not a' if path.exists() else 'no such'} directory. {give}")
        return value

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    repo_id, _, revision = value.partition("@")
    fetch = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    try:
        folder = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except IncompleteSnapshotError:
        raise UsageError(
            f"{flag} {value}: its snapshot in the local Hugging Face cache is incomplete, and this command never "
            f"downloads. Complete it first with {fetch}."
        ) from None
    except LocalEntryNotFoundError:
        raise UsageError(
            f"{flag} {value}: no such local directory, and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); this command never downloads. Fetch it first with {fetch}."
        ) from None
    if need_config and not (Path(folder) / "config.json").is_file():
        raise UsageError(
            f"{flag} {value}: its snapshot in the local Hugging Face cache ({folder}) has no config.json, and this "
            f"command never downloads. Fetch the whole repo first with {fetch}."
        )
    return folder

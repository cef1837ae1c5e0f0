"""Shared helpers for the benchmarks: shapes, timing, markdown output."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

# Model shapes used by the benchmarks. "1b" is the released VaultGemma.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        query_pre_attn_scalar=64,
    ),
    "1b": dict(),  # the defaults of VaultGemmaConfig are the release
}


def config_kwargs(shape: str) -> dict:
    """Config kwargs valid for both our class and the built-in (which has Gemma-2-2B defaults)."""
    from vaultgemma_hf import VaultGemmaConfig

    full = VaultGemmaConfig(**SHAPES[shape]).to_dict()
    keys = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
        "query_pre_attn_scalar layer_types attn_logit_softcapping final_logit_softcapping sliding_window "
        "max_position_embeddings tie_word_embeddings hidden_activation rms_norm_eps"
    ).split()
    return {key: full[key] for key in keys}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int, warmup: int
) -> dict[str, float]:
    """Median wall time of each function, the functions alternating run by run.

    Alternating (A B A B ...) rather than timing A then B keeps slow drifts of a shared machine (other processes,
    thermal state, allocator warm-up) from biasing the ratio.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

"""Time and peak memory of one training step: non-private AdamW vs DP-SGD with `DPGradientEngine` (and Opacus).

All variants run in the same process on the same shape, one after the other, each on a freshly built model (same
seed), with warm-up steps before the timed ones; the non-private baseline runs again last (``nonprivate#2``: its
ratio to the first shows drift over the case). Two cases:

* ``full``: every parameter trainable, tied input embedding / LM head included (Opacus cannot run this case);
* ``frozen``: embeddings and norms frozen; Opacus 1.6 (hooks and ghost clipping) is added when installed.

Each DP step is: forward of the micro-batch, ``engine.backward(per_example_loss)`` (per-sample clipping),
``engine.finalize_step(sigma=1, expected_batch_size=B)`` (noise), ``optimizer.step()``. The non-private step is
forward, ``loss.backward()`` of the batch-mean of the same per-example losses, ``optimizer.step()``.

Examples::

    python benchmarks/dp_step.py --device cpu --shape small --batch 4 --seq-len 128
    python benchmarks/dp_step.py --device cuda --shape 1b --batch 4 --seq-len 1024 --dtype bf16

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set size sampled every
millisecond during the timed steps (glibc is told to return freed memory at once so that RSS follows the live
tensors; it is an approximation).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vaultgemma_hf.dp.engine import DPGradientEngine  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2, head_dim=16),
    "small": dict(vocab_size=16384, hidden_size=256, intermediate_size=1536, num_hidden_layers=4, head_dim=64),
    "1b": dict(vocab_size=256000, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, head_dim=256),
}


def build_model(
    shape: str, impl: str, device: torch.device, seq_len: int, layers: int | None = None
) -> torch.nn.Module:
    kwargs = dict(SHAPES[shape])
    if layers is not None:  # e.g. the real 1B widths and vocabulary with fewer blocks, to fit a CPU run
        kwargs["num_hidden_layers"] = layers
    kwargs.update(
        num_attention_heads=4,
        num_key_value_heads=4,
        query_pre_attn_scalar=kwargs["head_dim"],
        layer_types=["full_attention"] * kwargs["num_hidden_layers"],
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        max_position_embeddings=max(1024, seq_len),
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    if impl == "vaultgemma_hf":
        from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM
    else:
        from transformers import VaultGemmaConfig, VaultGemmaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = VaultGemmaForCausalLM(VaultGemmaConfig(**kwargs))
    return model.train()


def freeze_embeddings_and_norms(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "norm" in name:
            p.requires_grad_(False)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(labels.shape).sum(dim=1) / (labels != -100).sum(dim=1).clamp(min=1)


class _PerExampleCriterion:
    """Criterion for Opacus' ghost clipping: per-example losses when ``reduction == "none"``."""

    reduction = "mean"

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = per_example_loss(logits, labels)
        return loss if self.reduction == "none" else loss.mean()


def make_step(mode: str, model: torch.nn.Module, args: argparse.Namespace) -> tuple[Callable, Callable]:
    """Returns (step(batch), cleanup())."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    C, sigma, B = 1e-2, 1.0, args.batch

    if mode.startswith("nonprivate"):

        def step(batch):
            with autocast(args):
                logits = model(input_ids=batch["input_ids"]).logits
            per_example_loss(logits, batch["labels"]).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, lambda: None

    if mode in ("dp", "dp_inexact"):
        engine = DPGradientEngine(model, C, exact_scaling=mode == "dp")
        generator = torch.Generator(device=args.device).manual_seed(0)

        def step(batch):
            with autocast(args):
                logits = model(input_ids=batch["input_ids"]).logits
            engine.backward(per_example_loss(logits, batch["labels"]))
            engine.finalize_step(sigma, B, generator=generator)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, engine.detach

    if mode == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_opt = DPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B)

        def step(batch):
            with autocast(args):
                logits = gsm(input_ids=batch["input_ids"]).logits
            per_example_loss(logits, batch["labels"]).mean().backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        return step, gsm._close

    if mode == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=C, use_ghost_clipping=True
        )
        dp_opt = DPOptimizerFastGradientClipping(
            opt, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B, loss_reduction="mean"
        )
        criterion = DPLossFastGradientClipping(gsm, dp_opt, _PerExampleCriterion(), loss_reduction="mean")

        def step(batch):
            with autocast(args):
                logits = gsm(input_ids=batch["input_ids"]).logits
            criterion(logits, batch["labels"]).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        return step, gsm._close

    raise ValueError(mode)


def autocast(args: argparse.Namespace):
    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _RssSampler:
    """Peak resident set size of this process, sampled in a background thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> _RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _release_freed_memory_at_once() -> None:
    """glibc: serve large allocations with mmap and trim the heap eagerly, so that RSS tracks live tensors."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: disables the dynamic threshold)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def free_memory(device: torch.device) -> None:
    """Collects what an earlier variant left (reference cycles through hooks, a failed variant's frames)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_mode(mode: str, case: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    free_memory(device)
    base_rss = _RssSampler.rss()
    model = build_model(args.shape, args.model, device, args.seq_len, args.layers)
    if case == "frozen":
        freeze_embeddings_and_norms(model)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = [
        {
            "input_ids": (ids := torch.randint(1, vocab, (args.batch, args.seq_len), generator=g).to(device)),
            "labels": ids,
        }
        for _ in range(2)
    ]
    step, cleanup = make_step(mode, model, args)
    for i in range(args.warmup):
        step(batches[i % 2])
    sync(device)
    gc.collect()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        sampler = contextlib.nullcontext()
    else:
        sampler = _RssSampler()
    with sampler:
        clock = time.process_time if args.clock == "process" else time.perf_counter
        for i in range(args.repeats):
            t0 = clock()
            step(batches[i % 2])
            sync(device)
            times.append(clock() - t0)
    # CPU: RSS above what the process held before this variant built its model (model + optimizer + step)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.peak - base_rss
    cleanup()
    attn = f"{type(model).__module__.split('.')[0]} {model.config._attn_implementation}"
    del model, step, cleanup, batches
    free_memory(device)
    return {
        "case": case,
        "mode": mode,
        "model": attn,
        "time_s": statistics.median(times),
        "min_time_s": min(times),
        "peak_gib": peak / 2**30,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--model", choices=["transformers", "vaultgemma_hf"], default="transformers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="override the shape's number of decoder blocks")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="bf16 = fp32 weights + autocast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default="full,frozen", help="comma-separated: full, frozen")
    parser.add_argument("--no-opacus", action="store_true", help="skip Opacus even if installed")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process = CPU time of this process (CPU only; steadier on a shared machine)",
    )
    parser.add_argument(
        "--dp-inexact", action="store_true", help="also run DP with exact_scaling=False (bf16 factor folding)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.device == "cpu":
        _release_freed_memory_at_once()
        if args.threads:
            torch.set_num_threads(args.threads)
    elif args.clock == "process":
        parser.error("--clock process is for --device cpu")
    try:
        import opacus

        have_opacus = not args.no_opacus
        print(f"opacus {opacus.__version__}" + (" (skipped: --no-opacus)" if args.no_opacus else ""))
    except ImportError as err:
        have_opacus = False
        print(f"opacus not importable, its rows are skipped: {err}")

    results = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        modes = ["nonprivate", "dp"] + (["dp_inexact"] if args.dp_inexact else [])
        modes += ["opacus_hooks", "opacus_ghost"] if case == "frozen" and have_opacus else []
        modes += ["nonprivate#2"]  # the baseline again, last: its ratio to the first shows drift (order bias)
        for mode in modes:
            try:
                res = run_mode(mode, case, args)
            except Exception as err:  # noqa: BLE001 - report and go on (e.g. Opacus refusing a model)
                res = {"case": case, "mode": mode, "error": f"{type(err).__name__}: {str(err)[:200]}"}
            results.append(res)
            base = next(
                (r for r in results if r["case"] == case and r["mode"] == "nonprivate" and "time_s" in r), None
            )
            if "time_s" in res and base is not None:
                res["time_ratio"] = res["time_s"] / base["time_s"]
                res["mem_ratio"] = res["peak_gib"] / base["peak_gib"]
            print(_format(res), flush=True)
            if args.json:  # after every row, so that a run cut short still leaves its JSON
                args.json.write_text(
                    json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
                )

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\n{device_name}, torch {torch.__version__}, shape={args.shape}"
        f"{'' if args.layers is None else f' with {args.layers} layers'}, batch={args.batch}, "
        f"seq_len={args.seq_len}, dtype={args.dtype}, {args.clock} clock, median of {args.repeats} after "
        f"{args.warmup} warm-up, model {next((r['model'] for r in results if 'model' in r), '?')} attention"
    )
    return 0


def _format(res: dict) -> str:
    head = f"{res['case']:>6} {res['mode']:<13}"
    if "error" in res:
        return f"{head} failed: {res['error']}"
    ratios = f"  x{res['time_ratio']:.2f} time  x{res['mem_ratio']:.2f} mem" if "time_ratio" in res else ""
    times = f"{res['time_s'] * 1000:9.1f} ms (min {res['min_time_s'] * 1000:9.1f})"
    return f"{head} {times}  {res['peak_gib']:7.3f} GiB{ratios}"


if __name__ == "__main__":
    raise SystemExit(main())

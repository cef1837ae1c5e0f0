#!/usr/bin/env python
"""Inference speed: vaultgemma_hf's VaultGemma vs transformers' built-in, same weights, same process and run.

Measures prefill tokens/s (no grad), eager decode tokens/s at batch 1 and 16 (dynamic cache, `generate`), and
compiled static-cache decode: our `CompiledGreedyDecoder` recipe vs transformers' own
`generate(cache_implementation="static")` (which compiles itself on GPU). Prints a markdown table with the
ratios ours / built-in.

    python benchmarks/inference.py --shape 1b --device cuda              # the H100 numbers in the docs
    python benchmarks/inference.py --shape tiny --device cpu --no-compile  # a quick CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM  # noqa: E402
from vaultgemma_hf.generation import CompiledGreedyDecoder  # noqa: E402

from _common import config_kwargs, hardware, markdown_table, synchronize, timed_interleaved  # noqa: E402


def build_models(shape: str, device: torch.device, dtype: torch.dtype):
    kwargs = config_kwargs(shape)
    torch.manual_seed(0)
    with device:
        ours = VaultGemmaForCausalLM(VaultGemmaConfig(**kwargs, attn_implementation="sdpa")).to(dtype).eval()
        # The built-in refuses SDPA; eager is its default path for this model.
        ref = (
            transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**kwargs, attn_implementation="eager"))
            .to(dtype)
            .eval()
        )
    ref.load_state_dict(ours.state_dict())
    # The comparison is ours on SDPA vs the built-in on eager attention, same dtype: refuse to measure anything else.
    impls = (ours.config._attn_implementation, ref.config._attn_implementation)
    assert impls == ("sdpa", "eager"), f"attention implementations {impls}, expected ('sdpa', 'eager')"
    assert {p.dtype for p in (*ours.parameters(), *ref.parameters())} == {dtype}
    return ours, ref


def expect_length(out: torch.Tensor, length: int) -> None:
    """Every timed generation must produce exactly `length` tokens per row (no early stop at EOS)."""
    if out.shape[1] != length:
        raise RuntimeError(f"generated {out.shape[1]} tokens per row, expected {length}")


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process: shows that a compiled path did compile."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def first_call(fn, device: torch.device) -> str:
    """Runs `fn` once (the compiling call) and describes its time and what dynamo compiled."""
    graphs, breaks = dynamo_counts()
    start = time.perf_counter()
    fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    graphs2, breaks2 = dynamo_counts()
    return f"{elapsed:.0f} s, {graphs2 - graphs} graphs, {breaks2 - breaks} breaks"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "small", "1b"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="bf16 on GPU, fp32 on CPU.")
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="Skip the compiled static-cache rows.")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ours, ref = build_models(args.shape, device, dtype)
    models = {"ours": ours, "built-in": ref}
    vocab = ours.config.vocab_size
    rows: list[list[str]] = []

    def add_row(row: list[str]) -> None:
        """Keeps the row for the final table and prints it at once (a run cut short still reports it)."""
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    prefill = torch.randint(3, vocab, (args.prefill_batch, args.prefill_len), device=device)
    with torch.inference_mode():
        times = timed_interleaved(
            {name: (lambda m=model: m(prefill, use_cache=False, logits_to_keep=1)) for name, model in models.items()},
            device,
            repeats=args.repeats,
            warmup=args.warmup,
        )
    tokens = prefill.numel()
    add_row(
        [
            f"prefill {args.prefill_batch}x{args.prefill_len} (ours sdpa, built-in eager)",
            f"{tokens / times['ours']:,.0f}",
            f"{tokens / times['built-in']:,.0f}",
            f"{times['built-in'] / times['ours']:.2f}x",
        ]
    )

    length = args.prompt_len + args.new_tokens
    # min_new_tokens = max_new_tokens: EOS is masked, every row generates exactly new_tokens.
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    eager = dict(gen, disable_compile=True)  # dynamic cache, never auto-compiled
    static = dict(gen, cache_implementation="static")  # transformers compiles this path itself on GPU

    def run_generate(model, prompt, kwargs):
        expect_length(model.generate(prompt, **kwargs), length)

    for batch in (int(b) for b in args.decode_batches.split(",")):
        prompt = torch.randint(3, vocab, (batch, args.prompt_len), device=device)
        times = timed_interleaved(
            {name: (lambda m=model, p=prompt: run_generate(m, p, eager)) for name, model in models.items()},
            device,
            repeats=args.repeats,
            warmup=1,
        )
        new = batch * args.new_tokens
        add_row(
            [
                f"decode batch {batch}, eager, dynamic cache",
                f"{new / times['ours']:,.1f}",
                f"{new / times['built-in']:,.1f}",
                f"{times['built-in'] / times['ours']:.2f}x",
            ]
        )
        if args.no_compile:
            continue
        decoder = CompiledGreedyDecoder(ours, max_cache_len=length)

        def run_ours(d=decoder, p=prompt):
            expect_length(d.generate(p, args.new_tokens), length)

        def run_ref(p=prompt):
            run_generate(ref, p, static)

        first_ours, first_ref = first_call(run_ours, device), first_call(run_ref, device)
        times = timed_interleaved(
            {"ours": run_ours, "built-in": run_ref},
            device,
            repeats=args.repeats,
            warmup=1,
        )
        add_row(
            [
                f"decode batch {batch}, static cache + compile (first call ours {first_ours}; built-in {first_ref})",
                f"{new / times['ours']:,.1f}",
                f"{new / times['built-in']:,.1f}",
                f"{times['built-in'] / times['ours']:.2f}x",
            ]
        )

    print(
        f"\nVaultGemma inference, shape={args.shape}, dtype={dtype}, {hardware(device)}, transformers "
        f"{transformers.__version__}\n"
    )
    print(markdown_table(["measure", "ours tok/s", "built-in tok/s", "ours / built-in"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

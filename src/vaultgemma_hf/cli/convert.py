"""`vaultgemma-hf convert`: JAX gemma-layout checkpoints (Orbax / .npz) <-> HF safetensors, adapter merging."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._io import SHORT_DTYPE_NAMES, dtype_name

PROGRESS_MIN_BYTES = 64 * 2**20
"""Progress bars are shown for sources at least this large (and never with --quiet)."""

EPILOG = """\
examples:
  vaultgemma-hf convert ckpt/ out-hf/ --config vaultgemma-1b --tokenizer tok/ --dtype bf16 --verify
  vaultgemma-hf convert params.npz out-hf/                 # .npz with '/'-joined keys, config from shapes
  vaultgemma-hf convert out-hf/ ckpt-back/ --to jax        # Orbax, layout as recorded at import
  vaultgemma-hf convert out-hf/ params.npz --to jax --gating-layout DF --attention-layout split
  vaultgemma-hf convert out-hf/ out-bf16/ --to hf --dtype bf16 --shard-size 500MB
  vaultgemma-hf convert --merge-lora adapter/ base-hf/ merged-hf/ --verify

The source format is detected from SRC: a directory with config.json + safetensors (HF), an Orbax checkpoint
directory, or a .npz file. Nothing is written at DST unless the whole conversion (and --verify) succeeded.
"""


def _size_of(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        total += sum((Path(root) / f).stat().st_size for f in files)
    return total


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `convert` on the `vaultgemma-hf` sub-command parsers."""
    parser = subparsers.add_parser(
        "convert",
        help="Convert weights between the JAX/Flax gemma layout and HF safetensors.",
        description=(
            "Convert VaultGemma weights between the JAX gemma-library layout (Orbax checkpoint or .npz) and HF "
            "safetensors, in both directions; re-save HF checkpoints (dtype, sharding); merge a PEFT adapter."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint (HF directory, Orbax directory or .npz)")
    parser.add_argument("dst", metavar="DST", help="output path (HF directory, Orbax directory or .npz)")
    parser.add_argument(
        "--to",
        choices=("hf", "jax"),
        help="target family (default: hf for JAX sources and with --merge-lora, jax for HF sources)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        type=dtype_name(SHORT_DTYPE_NAMES),
        default="auto",
        help="output dtype: auto (the source's), fp32 or bf16 (float32 and bfloat16, as `run` spells them, work too)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the HF model's logits with a numpy forward over the JAX weights on random prompts",
    )
    parser.add_argument(
        "--config", metavar="PRESET|PATH", help="JAX sources: preset (vaultgemma-1b, tiny) or config.json"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config value (JSON), repeatable, e.g. --override vocab_size=256000 --override rope_theta=10000",
    )
    parser.add_argument("--tokenizer", metavar="PATH", help="HF outputs: tokenizer directory or file to copy")
    parser.add_argument("--shard-size", default="5GB", help="HF outputs: maximum shard size (default 5GB)")
    parser.add_argument(
        "--merge-lora", metavar="ADAPTER_DIR", help="merge this PEFT adapter into the SRC weights before writing"
    )
    jax = parser.add_argument_group("JAX layout")
    jax.add_argument("--attention-layout", choices=("fused", "split"), help="JAX outputs: qkv_einsum or q/kv_einsum")
    jax.add_argument(
        "--gating-layout",
        type=str.upper,
        choices=("FD", "DF"),
        help="mlp/gating_einsum as [2,F,D] (FD) or [2,D,F] (DF); needed to read a source with F == D",
    )
    jax.add_argument("--jax-vocab-size", type=int, metavar="ROWS", help="JAX outputs: pad the embedding to ROWS")
    jax.add_argument("--jax-format", choices=("orbax", "npz"), help="JAX outputs (default: npz if DST ends in .npz)")
    jax.add_argument(
        "--drop-post-norms",
        action="store_true",
        help="JAX sources: drop post_attention_norm/post_ffw_norm instead of refusing (changes the function)",
    )
    check = parser.add_argument_group("verification")
    check.add_argument("--verify-prompts", type=int, default=3, help="random prompts (default 3)")
    check.add_argument("--verify-length", type=int, default=16, help="tokens per prompt (default 16)")
    check.add_argument("--verify-seed", type=int, default=0)
    check.add_argument(
        "--verify-rtol", type=float, default=None, help="tolerance relative to max(1, max |logit|) (default 1e-3)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the conversion; returns 0, 1 (verification failed) or 2 (bad input)."""
    from vaultgemma_hf.conversion import ConversionError, MissingDependencyError, VerificationError, convert
    from vaultgemma_hf.conversion.verify import DEFAULT_RTOL

    prefix = "vaultgemma-hf convert"
    if args.verify_prompts < 1 or args.verify_length < 1:
        print(f"{prefix}: error: --verify-prompts and --verify-length must be >= 1", file=sys.stderr)
        return 2
    progress = not args.quiet and os.path.exists(args.src) and _size_of(args.src) >= PROGRESS_MIN_BYTES
    try:
        report = convert(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            config=args.config,
            overrides=args.override,
            tokenizer=args.tokenizer,
            shard_size=args.shard_size,
            merge_adapter=args.merge_lora,
            attention_layout=args.attention_layout,
            gating_layout=args.gating_layout,
            jax_vocab_size=args.jax_vocab_size,
            jax_format=args.jax_format,
            drop_post_norms=args.drop_post_norms,
            verify=args.verify,
            verify_prompts=args.verify_prompts,
            verify_seq_len=args.verify_length,
            verify_seed=args.verify_seed,
            verify_rtol=DEFAULT_RTOL if args.verify_rtol is None else args.verify_rtol,
            overwrite=args.overwrite,
            progress=progress,
        )
    except VerificationError as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 1
    except (ConversionError, MissingDependencyError, OSError) as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0

"""`vaultgemma-hf run`: a text-generation pipeline over prompts from stdin or a file.

Mirrors transformers 4's `transformers run` (removed in transformers 5) for decoder-only models:

    echo "Patient Alex reported" | vaultgemma-hf run --max-new-tokens 20
    vaultgemma-hf run --model ./my-vaultgemma --input prompts.jsonl --output out.jsonl --format json --device 0

Input: one prompt per line, or JSON Lines with a "text" (or "prompt") field (detected, or `--input-format`).
Output: plain text (one generation per line, newlines escaped as \\n) or JSON Lines (`--format json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..fixtures import TINY_MODEL_DIR
from ._io import atomic_output

SUPPORTED_TASKS = ("text-generation",)
WRONG_TASKS = {
    "text2text-generation": "VaultGemma is a decoder-only causal LM: use --task text-generation.",
    "summarization": "VaultGemma is a pretrained causal LM: use --task text-generation with a prompt.",
    "translation": "VaultGemma is a pretrained causal LM: use --task text-generation with a prompt.",
}
PROGRESS_THRESHOLD = 8  # show a progress bar from this many prompts on


class UsageError(ValueError):
    """A user mistake: printed without a traceback, exit code 2."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="Run a pipeline (text-generation) on prompts from stdin or a file.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", default="text-generation", help="Pipeline task (only text-generation).")
    parser.add_argument(
        "--model", default=str(TINY_MODEL_DIR), help="Local model directory (default: the embedded tiny model)."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: the model directory).")
    parser.add_argument("--input", default=None, help="Prompt file (default: stdin).")
    parser.add_argument("--input-format", choices=("auto", "lines", "jsonl"), default="auto")
    parser.add_argument("--output", default=None, help="Output file, written atomically (default: stdout).")
    parser.add_argument("--format", choices=("plain", "json"), default="plain", help="Output format.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, N (GPU index) or auto (device_map).")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--batch-size", type=int, default=1, help="Prompts per generate() call.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    parser.add_argument(
        "--continuation-only", action="store_true", help="Print only the generated continuation, not the prompt."
    )
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto")
    parser.set_defaults(func=run_command)
    return parser


def read_prompts(stream, input_format: str) -> list[str]:
    """Reads prompts: one per non-empty line, or the "text"/"prompt" field of each JSON line."""
    lines = [line.rstrip("\n") for line in stream]
    lines = [line for line in lines if line.strip()]
    if input_format == "auto":
        input_format = "jsonl" if lines and all(line.lstrip().startswith("{") for line in lines) else "lines"
    if input_format == "lines":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"input line {number} is not valid JSON: {err}") from None
        text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UsageError(f'input line {number} has no string "text" or "prompt" field')
        prompts.append(text)
    return prompts


def _load_pipeline(args: argparse.Namespace):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

    from .. import VaultGemmaForCausalLM

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(
            f"--model {args.model}: no config.json there. Give a local model directory (nothing is downloaded)."
        )
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    load_kwargs: dict = {"dtype": dtype}
    device = None
    if args.device == "auto":
        load_kwargs["device_map"] = "auto"
    else:
        device = f"cuda:{args.device}" if args.device.isdigit() else args.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine.")
    config = AutoConfig.from_pretrained(model_dir)
    model_class = VaultGemmaForCausalLM if config.model_type == "vaultgemma" else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir, **load_kwargs)
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    return pipeline(args.task, model=model, tokenizer=tokenizer)


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    for name in ("temperature", "top_k", "top_p", "num_beams", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.continuation_only:
        kwargs["return_full_text"] = False
    return kwargs


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.task in WRONG_TASKS:
            raise UsageError(f"--task {args.task}: {WRONG_TASKS[args.task]}")
        if args.task not in SUPPORTED_TASKS:
            raise UsageError(f"--task {args.task}: unsupported; choose one of {', '.join(SUPPORTED_TASKS)}.")
        if args.max_new_tokens <= 0 or args.batch_size <= 0:
            raise UsageError("--max-new-tokens and --batch-size must be positive.")
        if args.input is not None:
            path = Path(args.input)
            if not path.is_file():
                raise UsageError(f"--input {args.input}: no such file.")
            with open(path, encoding="utf-8") as stream:
                prompts = read_prompts(stream, args.input_format)
        else:
            prompts = read_prompts(sys.stdin, args.input_format)
        if not prompts:
            raise UsageError("no prompts: give one per line on stdin or with --input.")
        generator = _load_pipeline(args)
    except (UsageError, OSError) as err:
        print(f"vaultgemma-hf run: {err}", file=sys.stderr)
        return 2
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)

    from tqdm.auto import tqdm

    show = args.progress == "always" or (args.progress == "auto" and len(prompts) >= PROGRESS_THRESHOLD)
    kwargs = _generation_kwargs(args)
    try:
        with (
            atomic_output(args.output) as out,
            tqdm(total=len(prompts), disable=not show, file=sys.stderr, unit="prompt") as progress,
        ):
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start : start + args.batch_size]
                results = generator(batch, batch_size=len(batch), **kwargs)
                for prompt, result in zip(batch, results):
                    text = result[0]["generated_text"]
                    if args.format == "json":
                        out.write(json.dumps({"prompt": prompt, "generated_text": text}, ensure_ascii=False) + "\n")
                    else:
                        out.write(text.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
                out.flush()  # stream results as they are produced
                progress.update(len(batch))
    except ValueError as err:  # e.g. a prompt longer than the model's positions
        print(f"vaultgemma-hf run: {err}", file=sys.stderr)
        return 2
    return 0

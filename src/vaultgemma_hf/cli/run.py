"""`vaultgemma-hf run`: a text-generation pipeline over prompts from stdin or a file.

Mirrors transformers 4's `transformers run` (removed in transformers 5) for decoder-only models:

    echo "Patient Alex reported" | vaultgemma-hf run --max-new-tokens 20
    vaultgemma-hf run --model ./my-vaultgemma --input prompts.jsonl --output out.jsonl --format json --device 0

Input (stdin, or `--input FILE`; `--input -` is stdin): one prompt per line, or JSON Lines with a "text" (or
"prompt") field. `--input-format auto` picks JSON Lines when the first non-blank line starts with "{".
In line mode a blank line is not a prompt: it gives an empty output line (JSON: {"prompt": "", "generated_text": ""}),
so output line N always answers input line N. Blank lines in JSON Lines input are skipped.

Output: plain text (one generation per line, newlines escaped as \\n) or JSON Lines (`--format json`), on stdout
as each batch finishes, or written atomically to `--output FILE` at the end.

Input is streamed: a batch is generated as soon as it holds `--batch-size` prompts or the input ends, so with the
default batch size of 1 each line typed or piped in is answered at once; with a larger batch size a slow stdin
waits for a full batch (or end of input).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..fixtures import TINY_MODEL_DIR
from ._io import atomic_output

SUPPORTED_TASKS = ("text-generation",)
WRONG_TASKS = {
    "text2text-generation": "VaultGemma is a decoder-only causal LM: use --task text-generation.",
    "summarization": "VaultGemma is a pretrained causal LM: use --task text-generation with a prompt.",
    "translation": "VaultGemma is a pretrained causal LM: use --task text-generation with a prompt.",
}
PROGRESS_THRESHOLD = 8  # with --progress auto, show a progress bar from this many prompts on
DEVICE_CHOICES = "cpu, cuda, cuda:N, N (GPU index), -1 (cpu), mps, xpu, xpu:N or auto"


class UsageError(ValueError):
    """A user mistake: printed without a traceback, exit code 2."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the `run` sub-command.

    Args:
        subparsers: The sub-parsers of the `vaultgemma-hf` parser.

    Returns:
        The `run` parser.
    """
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
    parser.add_argument("--input", default=None, help="Prompt file; - or none: stdin (read as lines arrive).")
    parser.add_argument(
        "--input-format",
        choices=("auto", "lines", "jsonl"),
        default="auto",
        help='lines: one prompt per line, a blank line gives an empty output line; jsonl: a "text" or "prompt" '
        'field per line; auto: jsonl if the first non-blank line starts with "{".',
    )
    parser.add_argument("--output", default=None, help="Output file, written atomically (default or -: stdout).")
    parser.add_argument("--format", choices=("plain", "json"), default="plain", help="Output format.")
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (device_map).")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="Prompts per generate() call; a batch runs once full or at end of input (so stdin waits for a full one).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate per prompt (>= 1).")
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=None, help="Sampling temperature (> 0).")
    parser.add_argument("--top-k", type=int, default=None, help="Top-k filtering (>= 0; 0 disables it).")
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1].")
    parser.add_argument("--num-beams", type=int, default=None, help="Beam search width (>= 1).")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1.0 means no penalty.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    parser.add_argument(
        "--continuation-only", action="store_true", help="Print only the generated continuation, not the prompt."
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"Progress bar on stderr; auto: from {PROGRESS_THRESHOLD} prompts on, not for a terminal on stdin.",
    )
    parser.set_defaults(func=run_command)
    return parser


def read_prompts(stream: Iterable[str], input_format: str = "auto") -> Iterator[str | None]:
    """Yields the prompts of `stream` lazily, each as soon as its line has been read.

    Args:
        stream: Lines of text (a file or stdin).
        input_format: "lines" (one prompt per line), "jsonl" (the "text" or "prompt" field of each JSON line) or
            "auto" (jsonl when the first non-blank line starts with "{", else lines).

    Yields:
        One prompt per line. In line mode a blank (whitespace-only) line yields None, so that results stay aligned
        with input lines; in jsonl mode blank lines are skipped.

    Raises:
        UsageError: A JSON line is invalid or has no string "text"/"prompt" field (raised when that line is reached).
    """
    mode = input_format
    hint = " (the first line looked like JSON; give --input-format lines for plain text)" if mode == "auto" else ""
    leading_blanks = 0  # blank lines seen while the format is still undecided
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if mode == "lines":
                yield None
            elif mode == "auto":
                leading_blanks += 1
            continue
        if mode == "auto":
            mode = "jsonl" if line.lstrip().startswith("{") else "lines"
            if mode == "lines":
                yield from itertools.repeat(None, leading_blanks)
        if mode == "lines":
            yield line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"input line {number} is not valid JSON: {err}{hint}") from None
        text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UsageError(f'input line {number} has no string "text" or "prompt" field{hint}')
        yield text


def _batches(items: Iterable[str | None], batch_size: int) -> Iterator[list[str | None]]:
    """Groups prompts into batches of `batch_size` prompts, each yielded as soon as it is full or the input ends.

    Blank items (None) ride along in order; a blank with no prompt pending is yielded at once.
    """
    pending: list[str | None] = []
    prompts = 0
    for item in items:
        pending.append(item)
        prompts += item is not None
        if prompts == batch_size or prompts == 0:
            yield pending
            pending, prompts = [], 0
    if pending:
        yield pending


def _count_prompts(path: Path) -> int:
    """Counts the non-blank lines of a file (the prompts it holds), for the progress bar's total."""
    with open(path, encoding="utf-8", errors="replace") as stream:
        return sum(1 for line in stream if line.strip())


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


class _Progress:
    """A progress bar on stderr counting prompts; in "auto" mode it opens once the input proves long."""

    def __init__(self, mode: str, total: int | None, interactive: bool) -> None:
        self.mode, self.total, self.done, self.bar = mode, total, 0, None
        self.lazy = mode == "auto" and total is None and not interactive  # stdin: open after PROGRESS_THRESHOLD
        if mode == "always" or (mode == "auto" and total is not None and total >= PROGRESS_THRESHOLD):
            self._open()

    def _open(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.done, file=sys.stderr, unit="prompt")

    def update(self, count: int) -> None:
        """Records `count` more generated prompts."""
        self.done += count
        if self.bar is None and self.lazy and self.done >= PROGRESS_THRESHOLD:
            self._open()
        elif self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        """Closes the bar, if one was opened."""
        if self.bar is not None:
            self.bar.close()


def _load_pipeline(args: argparse.Namespace, device: str | None):
    """Loads the model and tokenizer into a text-generation pipeline.

    Args:
        args: The parsed arguments (`model`, `tokenizer`, `dtype`, `task`, `device`).
        device: The device resolved by `_resolve_device`; None means `device_map="auto"`.

    Returns:
        The transformers pipeline.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

    from .. import VaultGemmaForCausalLM

    model_dir = Path(args.model)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    load_kwargs: dict = {"dtype": dtype, "use_safetensors": True}  # never unpickle weights
    if device is None:
        load_kwargs["device_map"] = "auto"
    config = AutoConfig.from_pretrained(model_dir)
    model_class = VaultGemmaForCausalLM if config.model_type == "vaultgemma" else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir, **load_kwargs)
    if device is not None:
        try:
            model.to(device)
        except RuntimeError as err:  # e.g. out of device memory
            raise UsageError(f"--device {args.device}: cannot move the model there: {err}") from None
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


def _open_input(args: argparse.Namespace, stack: contextlib.ExitStack):
    """Opens `--input` (a file, or stdin for none or "-"); returns the stream and the file path (None for stdin)."""
    if args.input is None or args.input == "-":
        return sys.stdin, None
    path = Path(args.input)
    if path.is_dir():
        raise UsageError(f"--input {args.input}: is a directory; give a file.")
    if not path.exists():
        raise UsageError(f"--input {args.input}: no such file.")
    return stack.enter_context(open(path, encoding="utf-8")), path


def _format_result(prompt: str, text: str, output_format: str) -> str:
    if output_format == "json":
        return json.dumps({"prompt": prompt, "generated_text": text}, ensure_ascii=False) + "\n"
    return text.replace("\\", "\\\\").replace("\n", "\\n") + "\n"


def run_command(args: argparse.Namespace) -> int:
    """Runs `vaultgemma-hf run`.

    Every flag and the output path are checked, and the first prompt is read, before the model is loaded; then
    prompts are generated batch by batch as the input arrives, each batch's results written and flushed at once.

    Args:
        args: The parsed arguments.

    Returns:
        The exit code: 0 on success, 2 for a usage error (one line on stderr), 1 for an I/O error while running.
    """
    with contextlib.ExitStack() as stack:
        try:
            if args.task in WRONG_TASKS:
                raise UsageError(f"--task {args.task}: {WRONG_TASKS[args.task]}")
            if args.task not in SUPPORTED_TASKS:
                raise UsageError(f"--task {args.task}: unsupported; choose one of {', '.join(SUPPORTED_TASKS)}.")
            _validate_generation_flags(args)
            if not (Path(args.model) / "config.json").is_file():
                raise UsageError(
                    f"--model {args.model}: no config.json there. Give a local model directory (nothing is downloaded)."
                )
            _check_output_path(args.output)
            device = _resolve_device(args.device)
            stream, path = _open_input(args, stack)
            items = read_prompts(stream, args.input_format)
            leading: list[str | None] = []  # blank lines before the first prompt, then that prompt
            for item in items:
                leading.append(item)
                if item is not None:
                    break
            else:
                raise UsageError("no prompts: give one per line on stdin or with --input.")
            generator = _load_pipeline(args, device)
        except (UsageError, OSError) as err:
            print(f"vaultgemma-hf run: {err}", file=sys.stderr)
            return 2
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)

        kwargs = _generation_kwargs(args)
        try:
            total = _count_prompts(path) if path is not None and path.is_file() and args.progress != "never" else None
            interactive = path is None and stream.isatty()
            progress = _Progress(args.progress, total, interactive)
            # inside the try: an error leaves atomic_output by exception, so a partial --output is never committed
            with atomic_output(args.output) as out, contextlib.closing(progress):
                for batch in _batches(itertools.chain(leading, items), args.batch_size):
                    prompts = [item for item in batch if item is not None]
                    results = iter(generator(prompts, batch_size=len(prompts), **kwargs) if prompts else ())
                    for item in batch:
                        if item is None:  # a blank input line: an empty result keeps the lines aligned
                            out.write(_format_result("", "", args.format))
                        else:
                            out.write(_format_result(item, next(results)[0]["generated_text"], args.format))
                    out.flush()  # stream results as they are produced
                    progress.update(len(prompts))
        except BrokenPipeError:  # stdout closed early (e.g. `| head -1`): stop quietly, as Python's docs advise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        except ValueError as err:  # a bad input line, or a prompt longer than the model's positions
            print(f"vaultgemma-hf run: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # e.g. a full disk while writing --output
            print(f"vaultgemma-hf run: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C on an interactive stdin; --output is left untouched
            print("vaultgemma-hf run: interrupted", file=sys.stderr)
            return 130
    return 0

"""`vaultgemma-hf run`: a text-generation pipeline over prompts from stdin or a file.

Mirrors transformers 4's `transformers run` (removed in transformers 5) for decoder-only models:

    echo "Patient Alex reported" | vaultgemma-hf run --max-new-tokens 20
    vaultgemma-hf run --model ./my-vaultgemma --input prompts.jsonl --output out.jsonl --format json --device 0
    vaultgemma-hf run --model google/vaultgemma-1b --input long-prompts.txt --truncate left

Model: `--model` (and `--tokenizer`) is a local directory, or the id of a Hub repo already in the local Hugging Face
cache (`owner/name`, optionally `owner/name@revision`; the cache is $HF_HUB_CACHE, by default
~/.cache/huggingface/hub). Nothing is ever downloaded: fetch a repo first with `hf download owner/name`.

Input (stdin, or `--input FILE`; `--input -` is stdin): one prompt per line, or JSON Lines with a "text" (or
"prompt", or `--text-field KEY`) field, in UTF-8 (a leading byte order mark is ignored). `--input-format auto` picks JSON Lines when the
first non-blank line starts with "{".
In line mode a blank line is not a prompt: it gives an empty output line (JSON: {"prompt": "", "generated_text": ""}),
so output line N always answers input line N. Blank lines in JSON Lines input are skipped.

Output: plain text (one generation per line, newlines escaped as \\n) or JSON Lines (`--format json`), on stdout
as each batch finishes, or written atomically to `--output FILE` at the end.

Input is streamed: a batch is generated as soon as it holds `--batch-size` prompts or the input ends, so with the
default batch size of 1 each line typed or piped in is answered at once; with a larger batch size a slow stdin
waits for a full batch (or end of input).

Decoding is greedy unless `--do-sample` is given; `--temperature`, `--top-k` and `--top-p` need it (alone they are
refused, not silently ignored). `--num-beams` and `--repetition-penalty` work either way.

Long prompts: a prompt's tokens plus `--max-new-tokens` must fit in the model's max_position_embeddings. With
`--truncate none` (the default) a longer prompt stops the run with an error naming its input line (exit code 2;
nothing is written to `--output`); with `--truncate left` it keeps only its last max_position_embeddings -
max_new_tokens tokens (after the <bos> token), with a warning on stderr naming the line. The output keeps the
whole prompt text followed by the generated continuation.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path

from ..fixtures import TINY_MODEL_DIR
from ._io import TORCH_DTYPE_NAMES, UsageError, atomic_output, dtype_name
from ._prompts import _batches, _count_prompts, read_numbered_prompts
from ._resolve import (
    DEVICE_CHOICES,
    _check_output_path,
    _resolve_device,
    _resolve_pretrained,
    _validate_generation_flags,
)

SUPPORTED_TASKS = ("text-generation",)
WRONG_TASKS = {
    "text2text-generation": "VaultGemma is a decoder-only causal LM: use --task text-generation.",
    "summarization": "VaultGemma is a pretrained causal LM: use --task text-generation with a prompt.",
    "translation": "VaultGemma is a pretrained causal LM: use --task text-generation with a prompt.",
}
PROGRESS_THRESHOLD = 8  # with --progress auto, show a progress bar from this many prompts on


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
        "--model",
        default=str(TINY_MODEL_DIR),
        help="Local model directory, or a Hub repo id (owner/name[@revision]) already in the local Hugging Face "
        "cache; never downloaded (default: the embedded tiny model).",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer directory or cached Hub repo id, like --model (default: the model's).",
    )
    parser.add_argument("--input", default=None, help="Prompt file; - or none: stdin (read as lines arrive).")
    parser.add_argument(
        "--input-format",
        choices=("auto", "lines", "jsonl"),
        default="auto",
        help='lines: one prompt per line, a blank line gives an empty output line; jsonl: a "text" or "prompt" '
        'field per line; auto: jsonl if the first non-blank line starts with "{".',
    )
    parser.add_argument(
        "--text-field",
        default=None,
        help='JSON Lines input: the key of the prompt (default: "text", else "prompt"), as in `vaultgemma-hf train`.',
    )
    parser.add_argument("--output", default=None, help="Output file, written atomically (default or -: stdout).")
    parser.add_argument(
        "--format",
        choices=("plain", "json"),
        default="plain",
        help="Output format: plain: one generation per line (newlines escaped as \\n); json: JSON Lines with "
        '"prompt" and "generated_text". (The input format is --input-format, unlike transformers 4\'s --format.)',
    )
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (device_map).")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        type=dtype_name(TORCH_DTYPE_NAMES),
        default="auto",
        help="Weights dtype (auto: the checkpoint's; fp32/bf16/fp16, as `convert` spells them, work too).",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="Prompts per generate() call; a batch runs once full or at end of input (so stdin waits for a full one).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate per prompt (>= 1).")
    parser.add_argument(
        "--truncate",
        choices=("none", "left"),
        default="none",
        help="A prompt too long for max_position_embeddings minus --max-new-tokens: none: stop with an error; "
        "left: keep its last tokens, with a warning on stderr.",
    )
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature (> 0; needs --do-sample)."
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="Top-k filtering (>= 0; 0 disables it; needs --do-sample)."
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1] (needs --do-sample)."
    )
    parser.add_argument("--num-beams", type=int, default=None, help="Beam search width (>= 1).")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1.0 means no penalty.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling (reproducible --do-sample runs).")
    parser.add_argument(
        "--continuation-only", action="store_true", help="Print only the generated continuation, not the prompt."
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"Progress bar on stderr; auto: from {PROGRESS_THRESHOLD} prompts on, not for a terminal on stdin; "
        "never: also no bar while the weights load.",
    )
    parser.set_defaults(func=run_command)
    return parser


def _prompt_token_limit(config, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave room for `max_new_tokens` within the model's positions (None: unknown)."""
    max_positions = getattr(config, "max_position_embeddings", None)
    return None if max_positions is None else max_positions - max_new_tokens


def _check_prompt_lengths(
    numbered: list[tuple[int, str]], tokenizer, limit: int | None, args: argparse.Namespace, warn
) -> None:
    """Checks that each prompt fits in `limit` tokens; with `--truncate left`, warns about those that will be cut.

    Args:
        numbered: (input line number, prompt) pairs.
        tokenizer: The pipeline's tokenizer (prompts are counted as the pipeline encodes them, special tokens
            included).
        limit: The most prompt tokens (`_prompt_token_limit`), or None when the model does not say.
        args: The parsed arguments (`truncate`, `max_new_tokens`).
        warn: Called with each warning line.

    Raises:
        UsageError: With `--truncate none`, a prompt is longer than `limit`.
    """
    if limit is None or not numbered:
        return
    max_positions = limit + args.max_new_tokens
    encoded = tokenizer([prompt for _, prompt in numbered], verbose=False)["input_ids"]  # verbose: no length warning
    for (number, _), ids in zip(numbered, encoded, strict=True):
        if len(ids) <= limit:
            continue
        budget = f"max_position_embeddings={max_positions} minus --max-new-tokens {args.max_new_tokens}"
        if args.truncate == "none":
            raise UsageError(
                f"input line {number}: the prompt is {len(ids)} tokens, more than the {limit} that fit ({budget}); "
                "give --truncate left to keep its last tokens, or shorten it."
            )
        warn(
            f"vaultgemma-hf run: warning: input line {number}: prompt truncated from {len(ids)} to its last "
            f"{limit} tokens ({budget})."
        )


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

    def write(self, message: str) -> None:
        """Prints a line on stderr without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        """Closes the bar, if one was opened."""
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    """Turns transformers' own progress bars (e.g. "Loading weights") off inside the block unless `enabled`."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            hf_logging.enable_progress_bar()


def _load_pipeline(args: argparse.Namespace, device: str | None, model_dir: str, tokenizer_dir: str):
    """Loads the model and tokenizer into a text-generation pipeline.

    Args:
        args: The parsed arguments (`dtype`, `task`, `device`, `max_new_tokens`, `truncate`).
        device: The device resolved by `_resolve_device`; None means `device_map="auto"`.
        model_dir: The local model directory (`_resolve_pretrained`).
        tokenizer_dir: The local tokenizer directory.

    Returns:
        The transformers pipeline.

    Raises:
        UsageError: `--max-new-tokens` leaves no room for a prompt, or `--truncate left` on a model that does not
            give its max_position_embeddings (both checked before the weights are loaded).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

    from .. import VaultGemmaForCausalLM

    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    load_kwargs: dict = {"dtype": dtype, "use_safetensors": True}  # never unpickle weights
    if device is None:
        load_kwargs["device_map"] = "auto"
    config = AutoConfig.from_pretrained(model_dir)
    limit = _prompt_token_limit(config, args.max_new_tokens)
    if limit is not None and limit < 1:
        max_positions = config.max_position_embeddings
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens}: leaves no room for a prompt within the model's "
            f"max_position_embeddings={max_positions}; give at most {max_positions - 1}."
        )
    if limit is None and args.truncate == "left":
        raise UsageError("--truncate left: the model's config gives no max_position_embeddings to truncate to.")
    model_class = VaultGemmaForCausalLM if config.model_type == "vaultgemma" else AutoModelForCausalLM
    with _transformers_progress_bars(args.progress != "never"):  # --progress never: no "Loading weights" bar
        model = model_class.from_pretrained(model_dir, **load_kwargs)
    if device is not None:
        try:
            model.to(device)
        except RuntimeError as err:  # e.g. out of device memory
            raise UsageError(f"--device {args.device}: cannot move the model there: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    tokenizer.truncation_side = "left"  # --truncate left keeps a prompt's end (special tokens such as <bos> stay)
    return pipeline(args.task, model=model, tokenizer=tokenizer)


def _generation_kwargs(args: argparse.Namespace, limit: int | None) -> dict:
    """The pipeline call's keyword arguments; `limit` is the most prompt tokens (`_prompt_token_limit`)."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.truncate == "left" and limit is not None:
        # tokenizer_encode_kwargs, not max_length=, which the pipeline would also pass to generate()
        kwargs.update(truncation=True, tokenizer_encode_kwargs={"max_length": limit})
    for name in ("temperature", "top_k", "top_p", "num_beams", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.continuation_only:
        kwargs["return_full_text"] = False
    return kwargs


def _open_input(args: argparse.Namespace, stack: contextlib.ExitStack):
    """Opens `--input` (a file, or stdin for none or "-"); returns the stream and the file path (None for stdin).

    Files and the real stdin are read in binary mode and decoded line by line (`read_numbered_prompts`), so that
    text that is not UTF-8 gives a usage error naming its line instead of a traceback from the text layer.
    """
    if args.input is None or args.input == "-":
        return getattr(sys.stdin, "buffer", sys.stdin), None  # a replaced sys.stdin (io.StringIO) has no buffer
    path = Path(args.input)
    if path.is_dir():
        raise UsageError(f"--input {args.input}: is a directory; give a file.")
    if not path.exists():
        raise UsageError(f"--input {args.input}: no such file.")
    return stack.enter_context(open(path, "rb")), path


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
            model_dir = _resolve_pretrained("--model", args.model, need_config=True)
            tokenizer_dir = _resolve_pretrained("--tokenizer", args.tokenizer, False) if args.tokenizer else model_dir
            _check_output_path(args.output)
            device = _resolve_device(args.device)
            stream, path = _open_input(args, stack)
            items = read_numbered_prompts(stream, args.input_format, args.text_field)
            leading: list[tuple[int, str | None]] = []  # blank lines before the first prompt, then that prompt
            for item in items:
                leading.append(item)
                if item[1] is not None:
                    break
            else:
                raise UsageError("no prompts: give one per line on stdin or with --input.")
            generator = _load_pipeline(args, device, model_dir, tokenizer_dir)
        except (UsageError, OSError) as err:
            print(f"vaultgemma-hf run: {err}", file=sys.stderr)
            return 2
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)

        limit = _prompt_token_limit(generator.model.config, args.max_new_tokens)
        kwargs = _generation_kwargs(args, limit)
        try:
            total = _count_prompts(path) if path is not None and path.is_file() and args.progress != "never" else None
            interactive = path is None and stream.isatty()
            progress = _Progress(args.progress, total, interactive)
            # inside the try: an error leaves atomic_output by exception, so a partial --output is never committed
            with atomic_output(args.output) as out, contextlib.closing(progress):
                for batch in _batches(itertools.chain(leading, items), args.batch_size):
                    numbered = [(number, prompt) for number, prompt in batch if prompt is not None]
                    _check_prompt_lengths(numbered, generator.tokenizer, limit, args, progress.write)
                    prompts = [prompt for _, prompt in numbered]
                    results = iter(generator(prompts, batch_size=len(prompts), **kwargs) if prompts else ())
                    for _, prompt in batch:
                        if prompt is None:  # a blank input line: an empty result keeps the lines aligned
                            out.write(_format_result("", "", args.format))
                        else:
                            out.write(_format_result(prompt, next(results)[0]["generated_text"], args.format))
                    out.flush()  # stream results as they are produced
                    progress.update(len(prompts))
        except BrokenPipeError:  # stdout closed early (e.g. `| head -1`): stop quietly, as Python's docs advise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        except ValueError as err:  # a bad input line, or (with --truncate none) a prompt too long for the model
            print(f"vaultgemma-hf run: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # e.g. a full disk while writing --output
            print(f"vaultgemma-hf run: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C on an interactive stdin; --output is left untouched
            print("vaultgemma-hf run: interrupted", file=sys.stderr)
            return 130
    return 0

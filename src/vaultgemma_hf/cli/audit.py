"""`vaultgemma-hf audit`: empirical privacy audit of a model trained with DP-SGD.

Three steps::

    vaultgemma-hf audit canaries --model ./base --num-canaries 1000 --output canaries.jsonl
    vaultgemma-hf train --model ./base --train-file data.jsonl --canary-file canaries.jsonl --output-dir out ...
    vaultgemma-hf audit run --model out --reference-model ./base --canaries canaries.jsonl \\
        --train-file data.jsonl --heldout-file heldout.jsonl --output audit.json

`audit run` reads the claimed (ε, δ) from the trained model's dp_state.json (or --epsilon/--delta), prints the
verdict and writes the full JSON report. Exit codes: 0 (no violation), 1 (the audit refutes the claimed ε),
2 (usage error).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from vaultgemma_hf.cli._io import UsageError, atomic_output
from vaultgemma_hf.cli._io import positive_int as _positive_int
from vaultgemma_hf.cli._resolve import DEVICE_CHOICES, _check_output_path, _resolve_device, _resolve_pretrained


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `audit canaries` and `audit run`."""
    parser = subparsers.add_parser(
        "audit",
        help="Empirical privacy audit: canaries, membership inference, extraction, one-run ε lower bound.",
        description=__doc__.split("\n\n")[0],
    )
    steps = parser.add_subparsers(dest="audit_command", metavar="STEP")

    make = steps.add_parser("canaries", help="Draw audit canaries and their secret inclusion coins.")
    make.add_argument("--model", required=True, help="Model directory (its vocabulary size and tokenizer are used).")
    make.add_argument("--tokenizer", help="Tokenizer directory (default: --model); its special tokens are excluded.")
    make.add_argument("--num-canaries", type=_positive_int, default=1000, help="Number of canaries m (default 1000).")
    make.add_argument("--length", type=_positive_int, default=32, help="Random tokens per canary (default 32).")
    make.add_argument("--no-bos", action="store_true", help="Do not start canaries with the BOS token.")
    make.add_argument("--seed", type=int, help="Seed (tests only; by default OS entropy draws tokens and coins).")
    make.add_argument("--output", required=True, help="Canary file to write (JSON Lines, holds the secret coins).")
    make.set_defaults(func=run_canaries)

    run = steps.add_parser("run", help="Audit a trained model against its canaries.")
    run.add_argument("--model", required=True, help="The trained model directory.")
    run.add_argument("--canaries", required=True, help="The canary file used for training.")
    run.add_argument(
        "--reference-model", help="The model before training: scores become log-likelihood ratios (recommended)."
    )
    run.add_argument("--tokenizer", help="Tokenizer directory (default: --model); needed for --train-file.")
    run.add_argument("--epsilon", type=float, help="Claimed ε (default: read from the model's dp_state.json).")
    run.add_argument("--delta", type=float, help="δ of the claim (default: dp_state.json's, else 1e-5).")
    run.add_argument("--significance", type=_probability, default=0.05, help="α of the lower bound (default 0.05).")
    run.add_argument(
        "--guesses",
        type=_positive_int,
        nargs="+",
        help="k values: guess the top-k canaries as members and the bottom-k as non-members; several values are "
        "Bonferroni-corrected (default: m // 10).",
    )
    run.add_argument(
        "--exposure-references", type=int, default=1000, help="Fresh reference canaries for exposure (default 1000)."
    )
    data = run.add_argument_group("training data (optional: membership inference on the data, extraction test)")
    data.add_argument("--train-file", help="The training documents (.jsonl/.txt), packed as for training.")
    data.add_argument("--heldout-file", help="Held-out documents of the same kind (same format).")
    data.add_argument("--text-field", default="text", help="Text key of .jsonl records (default: text).")
    data.add_argument("--seq-len", type=_positive_int, default=1024, help="Tokens per packed sequence (default 1024).")
    data.add_argument("--prefix-len", type=_positive_int, default=50, help="Extraction prefix tokens (default 50).")
    data.add_argument("--suffix-len", type=_positive_int, default=50, help="Extraction suffix tokens (default 50).")
    data.add_argument(
        "--max-extraction", type=_positive_int, default=1000, help="Sequences tested per set (default 1000)."
    )
    run.add_argument("--batch-size", type=_positive_int, default=16, help="Sequences per forward pass.")
    run.add_argument("--device", default="cpu", help=f"Device ({DEVICE_CHOICES}; default cpu).")
    run.add_argument("--seed", type=int, help="Seed (tests only).")
    run.add_argument("--output", help="Write the JSON report here (default: stdout).")
    run.add_argument(
        "--write-model-card",
        action="store_true",
        help="Add (or replace) an 'Empirical privacy audit' section in the model's README.md.",
    )
    run.set_defaults(func=run_audit)
    parser.set_defaults(func=lambda _args: (parser.print_help(sys.stderr), 2)[1])
    return parser


def _error(step: str, err: Exception) -> int:
    print(f"vaultgemma-hf audit {step}: error: {err}", file=sys.stderr)
    return 2


def run_canaries(args: argparse.Namespace) -> int:
    """Entry point of `vaultgemma-hf audit canaries`."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        import vaultgemma_hf  # noqa: F401  (registers VaultGemma with the Auto classes)
        from vaultgemma_hf.privacy_eval.canaries import make_canaries, save_canaries

        _check_output_path(args.output)
        model_dir = _resolve_pretrained("--model", args.model, need_config=True)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
        vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
        bos = None if args.no_bos else tokenizer.bos_token_id
        canary_set = make_canaries(
            args.num_canaries,
            vocab_size,
            length=args.length,
            excluded_token_ids=[i for i in tokenizer.all_special_ids if i is not None],
            bos_token_id=bos,
            seed=args.seed,
        )
        save_canaries(args.output, canary_set)
    except (ValueError, OSError) as err:
        return _error("canaries", err)
    print(
        f"Wrote {len(canary_set.canaries)} canaries ({len(canary_set.included)} to include) to {args.output}. "
        "It holds the secret inclusion coins: keep it from the attack being evaluated.",
        file=sys.stderr,
    )
    return 0


def _claim(model_dir: str, epsilon: float | None, delta: float | None) -> tuple[float | None, float]:
    """The claimed (ε, δ): flags first, then the trained model's dp_state.json."""
    state_path = Path(model_dir) / "dp_state.json"
    state: dict[str, Any] = {}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{state_path}: not valid JSON ({err.msg}).") from None
    if state.get("sampling") == "shuffle":
        print(
            "vaultgemma-hf audit run: warning: this model was trained with sampling='shuffle', whose guarantee is for "
            "zero-out adjacency; including or leaving out a canary is add/remove adjacency, so a bound above the "
            "claimed ε is not by itself a violation of that guarantee.",
            file=sys.stderr,
        )
    if epsilon is None and state:
        non_private = float(state.get("noise_multiplier", 1.0)) == 0.0
        value = state.get("epsilon")
        epsilon = math.inf if non_private or value in (None, "inf", "Infinity") else float(value)
    if delta is None:
        delta = float(state.get("target_delta", 1e-5)) if state else 1e-5
    if epsilon is not None and not epsilon > 0:
        raise UsageError(f"--epsilon must be positive, got {epsilon}.")
    if not 0.0 <= delta < 1.0:
        raise UsageError(f"--delta must be in [0, 1), got {delta}.")
    return epsilon, delta


def _load_sequences(path: str | None, tokenizer: Any, args: argparse.Namespace, max_positions: int | None):
    if path is None:
        return None
    from vaultgemma_hf.cli.train import read_documents
    from vaultgemma_hf.data.packing import pack_documents

    documents, _ = read_documents(path, args.text_field)
    packed = pack_documents(documents, tokenizer, seq_len=args.seq_len, max_position_embeddings=max_positions)
    # A one-token remainder has no next-token loss to score; it is left out.
    return [packed.input_ids[i, :n].tolist() for i in range(len(packed)) if (n := int(packed.lengths[i])) >= 2]


def run_audit(args: argparse.Namespace) -> int:
    """Entry point of `vaultgemma-hf audit run`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import vaultgemma_hf  # noqa: F401  (registers VaultGemma with the Auto classes)
        from vaultgemma_hf.privacy_eval.audit import run_privacy_audit
        from vaultgemma_hf.privacy_eval.canaries import check_canaries_fit, load_canaries

        _check_output_path(args.output)
        if args.heldout_file and not args.train_file:
            raise UsageError("--heldout-file needs --train-file (membership inference compares the two).")
        if args.exposure_references < 0:
            raise UsageError(f"--exposure-references must be >= 0, got {args.exposure_references}.")
        model_dir = _resolve_pretrained("--model", args.model, need_config=True)
        reference_dir = (
            _resolve_pretrained("--reference-model", args.reference_model, need_config=True)
            if args.reference_model
            else None
        )
        device = _resolve_device(args.device) or "cpu"
        canary_set = load_canaries(args.canaries)
        claimed_epsilon, delta = _claim(model_dir, args.epsilon, args.delta)

        def load(path: str):
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
            check_canaries_fit(canary_set, model.config.vocab_size)
            return model.to(device).eval()

        model = load(model_dir)
        reference = load(reference_dir) if reference_dir else None
        training = heldout = None
        if args.train_file:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
            limit = getattr(model.config, "max_position_embeddings", None)
            training = _load_sequences(args.train_file, tokenizer, args, limit)
            heldout = _load_sequences(args.heldout_file, tokenizer, args, limit)
        report = run_privacy_audit(
            model,
            canary_set,
            reference_model=reference,
            claimed_epsilon=claimed_epsilon,
            delta=delta,
            significance=args.significance,
            guesses_per_side=args.guesses,
            num_exposure_references=args.exposure_references,
            training_sequences=training,
            heldout_sequences=heldout,
            extraction_prefix_len=args.prefix_len,
            extraction_suffix_len=args.suffix_len,
            max_extraction_sequences=args.max_extraction,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        with atomic_output(args.output) as stream:
            stream.write(report.to_json())
        if args.write_model_card:
            from vaultgemma_hf.privacy_eval.model_card import write_audit_to_model_card

            card = write_audit_to_model_card(model_dir, report)
            print(f"Wrote the audit section of {card}.", file=sys.stderr)
    except (ValueError, OSError) as err:
        return _error("run", err)
    print(report.verdict_text, file=sys.stderr)
    return 1 if report.verdict == "violation" else 0

"""`vaultgemma-hf audit`: empirical privacy audit of a model trained with DP-SGD.

Three steps::

    vaultgemma-hf audit canaries --model ./base --num-canaries 1000 --output canaries.jsonl
    vaultgemma-hf train --model ./base --train-file data.jsonl --canary-file canaries.jsonl --output-dir out ...
    vaultgemma-hf audit run --model out --reference-model ./base --canaries canaries.jsonl \\
        --train-file data.jsonl --heldout-file heldout.jsonl --output audit.json

`audit run` reads the claimed (ε, δ) from the trained model's dp_state.json (or --epsilon/--delta), prints the
verdict and writes the full JSON report. Exit codes: 0 (no violation found), 2 (usage error; nothing is written),
3 (VIOLATION: the audit refutes the claimed ε). An unexpected crash exits with Python's 1 and a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from vaultgemma_hf.cli._io import TORCH_DTYPE_NAMES, UsageError, atomic_output, boolean, dtype_name
from vaultgemma_hf.cli._io import positive_int as _positive_int
from vaultgemma_hf.cli._resolve import DEVICE_CHOICES, _check_output_path, _resolve_device, _resolve_pretrained
from vaultgemma_hf.numbers import round_up


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() in ("0", "0.0") else _positive_int(text)


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
    make.add_argument(
        "--overwrite", action="store_true", help="Replace an existing canary file (its coins are lost for good)."
    )
    make.set_defaults(func=run_canaries)

    run = steps.add_parser("run", help="Audit a trained model against its canaries.")
    run.add_argument("--model", required=True, help="The trained model directory.")
    run.add_argument("--canaries", required=True, help="The canary file used for training.")
    run.add_argument(
        "--reference-model", help="The model before training: scores become log-likelihood ratios (recommended)."
    )
    run.add_argument("--tokenizer", help="Tokenizer directory (default: --model); needed for --train-file.")
    run.add_argument("--epsilon", type=float, help="Claimed ε (default: read from the model's dp_state.json).")
    run.add_argument(
        "--delta",
        type=float,
        help="δ of the claim (default: dp_state.json's target_delta, else 1e-5); with dp_state.json and no --epsilon, "
        "ε is recomputed at this δ from the saved accountant state.",
    )
    run.add_argument("--significance", type=_probability, default=0.05, help="α of the lower bound (default 0.05).")
    run.add_argument(
        "--guesses",
        type=_positive_int,
        nargs="+",
        help="k values: guess the top-k canaries as members and the bottom-k as non-members; several values are "
        "Bonferroni-corrected (default: m // 10).",
    )
    run.add_argument(
        "--exposure-references",
        type=_non_negative_int,
        default=1000,
        help="Fresh reference canaries for exposure (default 1000).",
    )
    data = run.add_argument_group("training data (optional: membership inference on the data, extraction test)")
    data.add_argument("--train-file", help="The training documents (.jsonl/.txt), packed as for training.")
    data.add_argument("--heldout-file", help="Held-out documents of the same kind (same format).")
    data.add_argument("--text-field", default="text", help="Text key of .jsonl records (default: text).")
    data.add_argument(
        "--cross-document-boundaries",
        type=boolean,
        default=True,
        metavar="{true,false}",
        help="Pack as training did (`vaultgemma-hf train --cross_document_boundaries`; default true).",
    )
    data.add_argument(
        "--seq-len",
        type=_positive_int,
        help="Tokens per packed sequence (default: the run's, from dp_state.json; else 1024).",
    )
    data.add_argument("--prefix-len", type=_positive_int, default=50, help="Extraction prefix tokens (default 50).")
    data.add_argument("--suffix-len", type=_positive_int, default=50, help="Extraction suffix tokens (default 50).")
    data.add_argument(
        "--max-sequences",
        type=_positive_int,
        default=1000,
        help="Sequences of each file used (a random subset beyond that; default 1000).",
    )
    run.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="Sequences per forward pass (default 8; a batch's full-vocabulary logits are held in memory).",
    )
    run.add_argument("--device", default="cpu", help=f"Device ({DEVICE_CHOICES}; default cpu).")
    run.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        type=dtype_name(TORCH_DTYPE_NAMES),
        default="float32",
        help="Weights dtype for scoring (default float32; fp32/bf16/fp16 work too; losses are always reduced in "
        "float32).",
    )
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
        if Path(args.output).exists() and not args.overwrite:
            raise UsageError(
                f"--output {args.output} exists: it may hold the secret coins of a run already trained. Pass "
                "--overwrite to replace it."
            )
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


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg}).") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: expected a JSON object.")
    return state


def _number(state: dict[str, Any], key: str, where: Path) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UsageError(f"{where}: {key!r} must be a number, got {value!r}; give --epsilon and --delta instead.")
    return float(value)


def _claim(where: Path, state: dict[str, Any], epsilon: float | None, delta: float | None):
    """The claimed (ε, δ): --epsilon (the user's own claim) first, else the trained model's dp_state.json (`where`)."""
    if delta is not None and not 0.0 <= delta < 1.0:  # also refuses NaN
        raise UsageError(f"--delta must be in [0, 1), got {delta}.")
    if epsilon is not None:
        if not epsilon > 0:
            raise UsageError(f"--epsilon must be positive, got {epsilon}.")
        if delta is None:
            delta = _number(state, "target_delta", where) if state else 1e-5
    elif state:
        saved_delta = _number(state, "target_delta", where)
        if _number(state, "noise_multiplier", where) == 0.0:
            epsilon = math.inf  # a non-private control run
        elif delta is None or delta == saved_delta:
            epsilon = _number(state, "epsilon", where)
            if not epsilon > 0:
                raise UsageError(
                    f"{where}: 'epsilon' is {epsilon}: the run took no DP step, there is nothing to audit."
                )
        else:
            from vaultgemma_hf.dp.accounting import PrivacyAccountant

            saved = state.get("accountant")
            if not isinstance(saved, dict):
                raise UsageError(f"{where}: no accountant state to recompute ε at --delta {delta}.")
            try:
                epsilon = PrivacyAccountant.from_state_dict(saved).get_epsilon(delta)
            except ValueError as err:
                raise UsageError(f"{where}: cannot recompute ε at --delta {delta}: {err}") from None
            if not epsilon > 0:
                raise UsageError(f"{where}: the saved accountant has taken no DP step, there is nothing to audit.")
            print(
                f"Claimed ε at δ={delta:g} recomputed from the saved accountant: {round_up(epsilon)}.", file=sys.stderr
            )
        delta = saved_delta if delta is None else delta
    elif delta is None:
        delta = 1e-5
    if not 0.0 <= delta < 1.0:
        raise UsageError(f"--delta must be in [0, 1), got {delta}.")
    return epsilon, delta


def _read_documents(path: str | None, args: argparse.Namespace) -> list[str] | None:
    """Reads `--train-file`/`--heldout-file` as training does (None without one); done before any model loads."""
    if path is None:
        return None
    from vaultgemma_hf.data.documents import read_documents

    return read_documents(path, args.text_field)[0]


def _load_sequences(
    documents: list[str] | None, tokenizer: Any, args: argparse.Namespace, seq_len: int, limit: int | None
):
    if documents is None:
        return None, 0
    from vaultgemma_hf.data.packing import pack_documents

    packed = pack_documents(
        documents,
        tokenizer,
        seq_len=seq_len,
        cross_document_boundaries=args.cross_document_boundaries,
        max_position_embeddings=limit,
    )
    # A one-token remainder has no next-token loss to score; it is left out (but counted as packed).
    sequences = [packed.input_ids[i, :n].tolist() for i in range(len(packed)) if (n := int(packed.lengths[i])) >= 2]
    return sequences, len(packed)


def run_audit(args: argparse.Namespace) -> int:
    """Entry point of `vaultgemma-hf audit run`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import vaultgemma_hf  # noqa: F401  (registers VaultGemma with the Auto classes)
        from vaultgemma_hf.privacy_eval.audit import run_privacy_audit
        from vaultgemma_hf.privacy_eval.canaries import check_canaries_fit, load_canaries
        from vaultgemma_hf.privacy_eval.model_card import model_card_with_audit
        from vaultgemma_hf.trainer import DP_STATE_NAME

        _check_output_path(args.output)
        if args.output and Path(args.output).resolve() == Path(args.canaries).resolve():
            raise UsageError("--output would overwrite the canary file.")
        if args.heldout_file and not args.train_file:
            raise UsageError("--heldout-file needs --train-file (membership inference compares the two).")
        model_dir = _resolve_pretrained("--model", args.model, need_config=True)
        reference_dir = (
            _resolve_pretrained("--reference-model", args.reference_model, need_config=True)
            if args.reference_model
            else None
        )
        protected = [Path(model_dir) / name for name in ("README.md", DP_STATE_NAME, "config.json")]
        if args.output and any(Path(args.output).resolve() == path.resolve() for path in protected):
            raise UsageError(f"--output {args.output} would overwrite a file of the audited model; write elsewhere.")
        if args.write_model_card:  # checked before hours of scoring, not after
            from vaultgemma_hf.privacy_eval.model_card import check_model_card

            if not os.access(model_dir, os.W_OK):
                raise UsageError(f"--write-model-card: cannot write in {model_dir}.")
            check_model_card(model_dir)
        device = _resolve_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")  # auto: one device
        canary_set = load_canaries(args.canaries)
        train_documents = _read_documents(args.train_file, args)  # bad data files fail before the models load
        heldout_documents = _read_documents(args.heldout_file, args)
        m = len(canary_set.canaries)
        if args.guesses and any(2 * k > m for k in args.guesses):
            raise UsageError(f"--guesses: each value must be at most {m // 2} for {m} canaries, got {args.guesses}.")
        state_path = Path(model_dir) / DP_STATE_NAME
        state = _read_state(state_path)
        claimed_epsilon, delta = _claim(state_path, state, args.epsilon, args.delta)
        sampling = state.get("sampling") if isinstance(state.get("sampling"), str) else None
        seq_len = args.seq_len or (state.get("seq_len") if isinstance(state.get("seq_len"), int) else None) or 1024

        def load(path: str):
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=getattr(torch, args.dtype))
            check_canaries_fit(canary_set, model.config.vocab_size)
            return model.to(device).eval()

        model = load(model_dir)
        reference = load(reference_dir) if reference_dir else None
        training = heldout = None
        if args.train_file:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
            limit = getattr(model.config, "max_position_embeddings", None)
            training, num_packed = _load_sequences(train_documents, tokenizer, args, seq_len, limit)
            heldout = _load_sequences(heldout_documents, tokenizer, args, seq_len, limit)[0]
            expected = num_packed + len(canary_set.included)
            if state.get("privacy_unit") == "sequence" and state.get("dataset_size") not in (None, expected):
                print(
                    f"warning: {args.train_file} packs into {num_packed} sequences and the canary file includes "
                    f"{len(canary_set.included)}, but the run trained on {state['dataset_size']}: the training file, "
                    "its packing options or the canary file may not be this run's.",
                    file=sys.stderr,
                )
        report = run_privacy_audit(
            model,
            canary_set,
            reference_model=reference,
            claimed_epsilon=claimed_epsilon,
            delta=delta,
            significance=args.significance,
            sampling=sampling,
            guesses_per_side=args.guesses,
            num_exposure_references=args.exposure_references,
            training_sequences=training,
            heldout_sequences=heldout,
            max_data_sequences=args.max_sequences,
            extraction_prefix_len=args.prefix_len,
            extraction_suffix_len=args.suffix_len,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        card = model_card_with_audit(model_dir, report) if args.write_model_card else None  # read before writing
        with atomic_output(args.output) as stream:
            stream.write(report.to_json())
    except (ValueError, OSError) as err:
        return _error("run", err)
    if card is not None:  # after the report: a failure here is reported, and the verdict's exit code still stands
        from vaultgemma_hf.atomic_files import atomic_write_text

        try:
            atomic_write_text(card[0], card[1])
            print(f"Wrote the audit section of {card[0]}.", file=sys.stderr)
        except OSError as err:
            print(
                f"vaultgemma-hf audit run: warning: the report is written, the model card is not: {err}",
                file=sys.stderr,
            )
    for name, result in (report.extraction or {}).items():
        if result["num_tested"] == 0:
            print(
                f"warning: no {name} sequence has {args.prefix_len + args.suffix_len} tokens; the extraction test "
                "did not run on them (lower --prefix-len/--suffix-len).",
                file=sys.stderr,
            )
    if sampling == "shuffle":
        print(
            "warning: this model was trained with sampling='shuffle', whose guarantee is for zero-out adjacency; "
            "the canary test is add/remove adjacency, so it cannot refute that claim.",
            file=sys.stderr,
        )
    print(report.verdict_text, file=sys.stderr)
    return 3 if report.verdict == "violation" else 0

#!/usr/bin/env python
"""The main job on the embedded default, end to end and offline (what `make demo` runs):

1. `vaultgemma-hf audit canaries`: draw random canaries, each to be trained on with a secret coin flip;
2. `vaultgemma-hf plan`: choose logical batch size, steps and noise for a target (ε, δ) on the tiny corpus (plus
   the included canaries);
3. `vaultgemma-hf train --plan`: DP-SGD continued pretraining of the tiny VaultGemma exactly as planned, writing
   the model, its accountant state and a model card that discloses the DP configuration;
4. `vaultgemma-hf audit run`: check the run empirically (membership inference, exposure, one-run ε lower bound
   against the claimed ε) and add the results to the model card;
5. `vaultgemma-hf run`: generate with the trained model.

    python examples/demo.py --output-dir outputs/demo [--epsilon 8]

Point the same commands at a real checkpoint and corpus for real work (see docs/source/en/dp_trainer.md).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

from vaultgemma_hf.cli.main import main as cli
from vaultgemma_hf.fixtures import TINY_CORPUS, TINY_MODEL_DIR


def step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ vaultgemma-hf {' '.join(argv)}", flush=True)
    code = cli(argv)
    if code != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {code}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan, model_dir, canaries, audit = out / "plan.json", out / "model", out / "canaries.jsonl", out / "audit.json"

    step(
        "1. draw privacy-audit canaries",
        ["audit", "canaries", "--model", str(TINY_MODEL_DIR), "--num-canaries", "100", "--length", "16", "--output",
         str(canaries), "--overwrite"],  # the demo trains again from scratch each time
    )  # fmt: skip
    step(
        "2. plan the privacy budget",
        [
            "plan", "--epsilon", str(args.epsilon), "--dataset", str(TINY_CORPUS), "--tokenizer", str(TINY_MODEL_DIR),
            "--canary-file", str(canaries),
            "--seq-len", str(args.seq_len), "--config", str(TINY_MODEL_DIR), "--batch-sizes", "8,16,32",
            "--steps", "10,20,40", "--min-steps", "10", "--tokens", "200000", "--json", str(plan),
        ],
    )  # fmt: skip
    step(
        "3. DP-SGD continued pretraining, as planned",
        [
            "train", "--model", str(TINY_MODEL_DIR), "--train-file", str(TINY_CORPUS), "--canary-file", str(canaries),
            "--seq-len",
            str(args.seq_len), "--plan", str(plan), "--output-dir", str(model_dir),
            "--per-device-train-batch-size", "8", "--learning-rate", "1e-3", "--logging-steps", "5",
            "--save-strategy", "no", "--report-to", "none",
        ],
    )  # fmt: skip
    step(
        "4. audit the trained model and add the results to its model card",
        ["audit", "run", "--model", str(model_dir), "--reference-model", str(TINY_MODEL_DIR), "--canaries",
         str(canaries), "--exposure-references", "200", "--write-model-card", "--output", str(audit)],
    )  # fmt: skip
    prompts = out / "prompts.txt"
    prompts.write_text("Patient Alex reported\nCustomer Kim in\n", encoding="utf-8")
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        step("5. generate with the trained model", ["run", "--model", str(model_dir), "--input", str(prompts),
                                                     "--max-new-tokens", "12"])  # fmt: skip
    print(buffer.getvalue(), end="")

    state = json.loads((model_dir / "dp_state.json").read_text())
    card = model_dir / "README.md"
    print(f"\n=== done: model, dp_state.json and model card in {model_dir}")
    print(
        json.dumps(
            {
                k: state[k]
                for k in state
                if k in ("epsilon", "target_delta", "accountant_steps", "noise_multiplier", "sampling")
            },
            indent=2,
        )
    )
    report = json.loads(audit.read_text())
    print(f"audit: {report['verdict']}, one-run ε lower bound {report['canaries']['one_run']['epsilon_lower_bound']:.3g}, "
          f"canary membership AUC {report['canaries']['membership_inference']['auc']:.3f} ({audit})")  # fmt: skip
    print(f"model card: {card} ({len(card.read_text().splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

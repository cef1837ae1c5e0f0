"""The example scripts under examples/ run end to end (offline, tiny fixture model and corpus, CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.trainer import DP_STATE_NAME

ROOT = Path(__file__).resolve().parents[1]
PRINTED_EPSILON = re.compile(r"(\d+) steps: epsilon = (\S+) at delta = (\S+)\. Model and model card in")


def test_dp_continued_pretraining_example_runs(tmp_path):
    """On the fixture corpus given as .jsonl (with an extra field): the example reads files as `train` does."""
    from vaultgemma_hf.fixtures import TINY_CORPUS

    corpus = tmp_path / "notes.jsonl"
    lines = Path(TINY_CORPUS).read_text(encoding="utf-8").splitlines()
    corpus.write_text("".join(json.dumps({"id": i, "note": line}) + "\n" for i, line in enumerate(lines) if line))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dp_continued_pretraining.py"), "--max-steps", "1"]
        + ["--train-file", str(corpus), "--text-field", "note", "--output-dir", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    printed = PRINTED_EPSILON.search(result.stdout)
    assert printed, result.stdout[-2000:]
    steps, epsilon, delta = int(printed.group(1)), float(printed.group(2)), float(printed.group(3))
    assert steps == 1
    assert math.isfinite(epsilon) and 0 < epsilon <= 8.0  # the script's default target_epsilon
    assert 0 < delta < 1

    state = json.loads((out / DP_STATE_NAME).read_text(encoding="utf-8"))
    assert state["accountant_steps"] == 1 and state["target_epsilon"] == 8.0
    recorded = state["epsilon"]
    assert isinstance(recorded, float) and math.isfinite(recorded) and 0 < recorded <= 8.0
    assert round_up(recorded) == printed.group(2)  # the printed ε is the recorded one, rounded up

    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"{recorded:.4g}" in card and "NOT PRIVATE" not in card

"""The example scripts under examples/ run end to end (offline, tiny fixture model and corpus, CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from vaultgemma_hf.trainer import DP_STATE_NAME

ROOT = Path(__file__).resolve().parents[1]
PRINTED_EPSILON = re.compile(r"(\d+) steps: epsilon = (\S+) at delta = (\S+)\. Model and model card in")


def test_dp_continued_pretraining_example_runs(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dp_continued_pretraining.py"), "--max-steps", "1"]
        + ["--output-dir", str(out)],
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
    assert f"{recorded:.4g}" == printed.group(2)  # the printed ε is the recorded one

    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"{recorded:.4g}" in card and "NOT PRIVATE" not in card


def test_dp_continued_pretraining_example_reads_jsonl_like_train(tmp_path):
    """The example read every line as a document, so a .jsonl file (the format the docs use) was trained on as raw
    JSON text; it now reads files as `vaultgemma-hf train` does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dp_example", ROOT / "examples" / "dp_continued_pretraining.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "Patient Alex reported", "id": 1}\n\n{"text": "Customer Kim in", "id": 2}\n')
    assert example.read_training_documents(str(data)) == ["Patient Alex reported", "Customer Kim in"]
    notes = tmp_path / "notes.txt"
    notes.write_text("Patient Alex reported\n\n  Customer Kim in \n")
    assert example.read_training_documents(str(notes)) == ["Patient Alex reported", "Customer Kim in"]

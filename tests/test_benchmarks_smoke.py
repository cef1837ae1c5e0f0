"""The GPU benchmark scripts run end to end at a tiny shape on CPU, without the packages the device image lacks.

`benchmarks/gpu_suite.sh` runs once on a borrowed GPU; a crash there wastes the chance. These runs use the same
options as the GPU run (bf16, --dp-inexact) with `dp_accounting` blocked, as on the device image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs a script as __main__ with dp_accounting unimportable (the device image does not have it).
_BLOCKED_RUN = """
import runpy, sys
from importlib.abc import MetaPathFinder
class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dp_accounting":
            raise ModuleNotFoundError("blocked: " + name, name=name)
sys.meta_path.insert(0, Block())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dp_step_tiny(tmp_path):
    out = run_script(
        "dp_step.py",
        *"--device cpu --shape tiny --batch 2 --seq-len 16 --repeats 1 --warmup 1 --dtype bf16 --dp-inexact".split(),
        "--json",
        str(tmp_path / "dp.json"),
    )
    assert "failed" not in out, out
    for case in ("full", "frozen"):
        for mode in ("nonprivate", "dp", "dp_inexact", "nonprivate#2"):
            assert f"{case:>6} {mode:<13}" in out, out
    assert (tmp_path / "dp.json").is_file()


def test_inference_tiny():
    args = "--shape tiny --device cpu --dtype bfloat16 --no-compile --repeats 1 --warmup 1 --new-tokens 3"
    out = run_script("inference.py", *args.split(), "--prefill-len", "16", "--decode-batches", "1,3")
    for row in ("prefill 8x16", "decode batch 1, eager", "decode batch 3, eager"):
        assert row in out, out


@pytest.mark.skipif(
    not os.environ.get("VAULTGEMMA_HF_RUN_SLOW"), reason="compiles on CPU; set VAULTGEMMA_HF_RUN_SLOW=1"
)
def test_inference_tiny_compiled():
    args = "--shape tiny --device cpu --repeats 1 --warmup 1 --new-tokens 3 --prefill-len 16 --decode-batches 2"
    out = run_script("inference.py", *args.split())
    assert "decode batch 2, static cache + compile (first call ours" in out, out
    assert "1 graphs, 0 breaks; built-in" in out, out  # ours compiled as one graph (the built-in compiles on GPU only)

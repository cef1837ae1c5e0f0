"""The docs' runnable examples run: every python block of the quickstart and the privacy audit page, and the README's offline example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[str]:
    return PY_BLOCK.findall(path.read_text(encoding="utf-8"))


EXAMPLES = [(f"quickstart-{i}", code) for i, code in enumerate(blocks(ROOT / "docs/source/en/quickstart.md"), 1)]
EXAMPLES += [
    (f"privacy_audit-{i}", code) for i, code in enumerate(blocks(ROOT / "docs/source/en/privacy_audit.md"), 1)
]
EXAMPLES += [(f"README-{i}", code) for i, code in enumerate(blocks(ROOT / "README.md"), 1) if "TINY_MODEL_DIR" in code]


def test_examples_were_found():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("name,code", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs_offline(name, code, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"

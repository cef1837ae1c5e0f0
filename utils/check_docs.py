#!/usr/bin/env python
"""Checks the markdown docs: relative links resolve and every ```python block parses.

python utils/check_docs.py docs/source/en
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(#[^)]*)?\)")
PY_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def check(root: Path) -> list[str]:
    problems = []
    files = sorted(root.rglob("*.md")) + [root.parents[2] / "README.md"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        for target, _ in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                problems.append(f"{path}: broken link {target}")
        for number, block in enumerate(PY_BLOCK.findall(text), start=1):
            code = "\n".join(line[4:] if line.startswith((">>> ", "... ")) else line for line in block.splitlines())
            try:
                ast.parse(code)
            except SyntaxError as err:
                problems.append(f"{path}: python block {number} does not parse: {err}")
    return problems


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/source/en").resolve()
    problems = check(root)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

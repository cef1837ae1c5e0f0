"""The environment switch of the Auto-class policy (`vaultgemma_hf.models.auto`), importable without torch.

`vaultgemma_hf/__init__.py` reads it to decide whether the registration can wait; `models/auto.py` reads it to
register. One definition serves both.
"""

from __future__ import annotations

import os

OVERRIDE_ENV = "VAULTGEMMA_HF_OVERRIDE_AUTO"


def override_requested() -> bool:
    """True when `VAULTGEMMA_HF_OVERRIDE_AUTO` is 1, true or yes (any case, surrounding spaces ignored)."""
    return os.environ.get(OVERRIDE_ENV, "").strip().lower() in {"1", "true", "yes"}

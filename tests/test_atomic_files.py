"""Atomic writes: nothing partial on failure, and the permissions of a plain `open(path, "w")` (canaries: 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from test_dp_trainer_guards import _summary as summary  # a DPTrainingSummary with test values
from vaultgemma_hf.atomic_files import atomic_stream, atomic_write_bytes, atomic_write_text
from vaultgemma_hf.cli.main import main
from vaultgemma_hf.privacy_eval.canaries import make_canaries, save_canaries
from vaultgemma_hf.trainer.model_card import write_model_card


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_replaced_and_explicit_modes(tmp_path, umask_027):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "a")  # the directory is created
    assert target.read_text() == "a" and mode(target) == 0o640  # 0666 less the umask, not mkstemp's 0600
    target.chmod(0o604)
    atomic_write_bytes(target, b"b")
    assert target.read_bytes() == b"b" and mode(target) == 0o604  # a replaced file keeps its mode
    atomic_write_text(target, "c", mode=0o600)
    assert mode(target) == 0o600


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "file.txt"
    with pytest.raises(RuntimeError), atomic_stream(target) as stream:
        stream.write("partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_stream(target) as stream:
        stream.write("partial")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"] and target.read_text() == "old"
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")


def test_package_outputs_get_normal_modes_and_canaries_stay_private(tmp_path, umask_027):
    """Model card and plan (meant to be shared) follow the umask; the canary file (secret coins) is owner-only."""
    card = write_model_card(tmp_path / "model", summary())
    assert mode(card) == 0o640
    plan = tmp_path / "plan.json"
    argv = ["plan", "--epsilon", "8", "--dataset-size", "1e4", "--batch-sizes", "64", "--steps", "10"]
    assert main([*argv, "--min-steps", "1", "--workers", "1", "--quiet", "--json", str(plan)]) == 0
    assert mode(plan) == 0o640
    canaries = tmp_path / "canaries.jsonl"
    save_canaries(canaries, make_canaries(4, 97, length=4, seed=0))
    assert mode(canaries) == 0o600

"""DDP: two CPU processes (torchrun, gloo) make the same DP-SGD update as one process, with noise added once.

The worker (tests/ddp_dp_trainer_worker.py) trains one logical step with SGD (lr 1) and seeded sampling/noise,
so the update is θ_before − θ_after = (Σ clip(g_i) + noise) / L. Oracles: the same step run in this (single)
process, and the closed-form noise variance σ²C²/L² per coordinate.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import ddp_dp_trainer_worker as worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIGMA = 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(Path(__file__).parent / "ddp_dp_trainer_worker.py"),
        "--out",
        str(out),
        "--sigmas",
        "0.0",
        str(SIGMA),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def load(sigma: float, rank: int):
        update = load_file(str(out / f"update_sigma{sigma}_rank{rank}.safetensors"))
        summary = json.loads((out / f"summary_sigma{sigma}_rank{rank}.json").read_text())
        return update, summary

    return load, out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return {sigma: worker.run_one_step(str(out / f"run-{sigma}"), sigma) for sigma in (0.0, SIGMA)}


def _flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([update[name].flatten().double() for name in sorted(update)])


def test_two_processes_make_the_same_update_as_one_without_noise(ddp_run, single_run):
    load, _ = ddp_run
    two, summary = load(0.0, 0)
    one, single_summary = single_run[0.0]
    assert summary["world_size"] == 2 and single_summary["world_size"] == 1
    assert summary["accountant_steps"] == summary["global_step"] == 1
    assert summary["dp_batch_size"] == single_summary["dp_batch_size"] > 0
    assert _flat(one).abs().max() > 0
    torch.testing.assert_close(_flat(two), _flat(one), rtol=1e-5, atol=1e-7)
    replica, _ = load(0.0, 1)
    torch.testing.assert_close(_flat(replica), _flat(two), rtol=0, atol=0)  # both ranks hold the same model


def test_noise_is_added_exactly_once(ddp_run, single_run):
    load, _ = ddp_run
    noisy_two, summary = load(SIGMA, 0)
    clean_two, _ = load(0.0, 0)
    noisy_one, single_summary = single_run[SIGMA]
    clean_one, _ = single_run[0.0]
    assert summary["epsilon"] == pytest.approx(single_summary["epsilon"], rel=1e-12)
    # per coordinate the noise on the update is N(0, (σC/L)^2): standardised variance 1 (2 if added twice)
    scale = SIGMA * worker.CLIP / worker.LOGICAL_BATCH
    z_two = (_flat(noisy_two) - _flat(clean_two)) / scale
    z_one = (_flat(noisy_one) - _flat(clean_one)) / scale
    n = z_two.numel()
    assert n > 10_000
    tolerance = 5 * (2 / n) ** 0.5  # 5 standard errors of a variance estimate
    assert abs(z_two.var().item() - 1) < tolerance
    assert abs(z_one.var().item() - 1) < tolerance
    assert abs(z_two.mean().item()) < 5 / n**0.5
    # with the same seeds, rank 0 draws the same noise as the single process: identical updates
    torch.testing.assert_close(_flat(noisy_two), _flat(noisy_one), rtol=1e-5, atol=1e-6)
    replica, _ = load(SIGMA, 1)
    torch.testing.assert_close(_flat(replica), _flat(noisy_two), rtol=0, atol=0)

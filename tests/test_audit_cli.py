"""`vaultgemma-hf audit canaries` → `vaultgemma-hf train --canary-file` → `vaultgemma-hf audit run`, end to end."""

from __future__ import annotations

import json

import pytest

from vaultgemma_hf.cli.main import main
from vaultgemma_hf.privacy_eval import load_canaries
from vaultgemma_hf.trainer import DP_STATE_NAME


@pytest.fixture
def corpus(tmp_path):
    from vaultgemma_hf.fixtures import TINY_CORPUS

    lines = [line for line in TINY_CORPUS.read_text().splitlines() if line.strip()]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[:60]))
    heldout.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[200:260]))
    return train, heldout


TRAIN_FLAGS = [
    "--seq-len", "32", "--logical-batch-size", "16", "--per-device-train-batch-size", "16", "--learning-rate", "1e-2",
    "--lr-scheduler-type", "constant", "--target-delta", "1e-5", "--use-cpu", "--report-to", "none",
    "--save-strategy", "no", "--disable-tqdm", "true",
]  # fmt: skip


def test_audit_commands_end_to_end(tmp_path, tiny_model_dir, corpus, capsys):
    from transformers import AutoTokenizer

    train, heldout = corpus
    canaries = tmp_path / "canaries.jsonl"
    assert main(["audit", "canaries", "--model", str(tiny_model_dir), "--num-canaries", "60", "--length", "12",
                 "--seed", "0", "--output", str(canaries)]) == 0  # fmt: skip
    canary_set = load_canaries(canaries)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert canary_set.vocab_size == 512 and set(tokenizer.all_special_ids) <= set(canary_set.excluded_token_ids)
    assert all(c.token_ids[0] == tokenizer.bos_token_id for c in canary_set.canaries)

    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(train), "--canary-file", str(canaries),
                 "--output-dir", str(out), "--noise-multiplier", "0", "--max-steps", "60", *TRAIN_FLAGS])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    num_included = len(canary_set.included)
    assert f"Added {num_included} of 60 audit canaries" in captured.out
    state = json.loads((out / DP_STATE_NAME).read_text())

    report_path = tmp_path / "audit.json"
    argv = ["audit", "run", "--model", str(out), "--reference-model", str(tiny_model_dir), "--canaries",
            str(canaries), "--train-file", str(train), "--heldout-file", str(heldout), "--seq-len", "32",
            "--prefix-len", "8", "--suffix-len", "8", "--exposure-references", "100", "--seed", "0"]  # fmt: skip
    assert main([*argv, "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["claimed_epsilon"] == "inf" and report["verdict"] == "non_private"  # read from dp_state.json
    assert report["delta"] == state["target_delta"]
    assert report["canaries"]["num_included"] == num_included
    assert report["canaries"]["membership_inference"]["auc"] > 0.9
    assert report["training_data"]["num_members"] > 0 and report["extraction"]["heldout"]["num_tested"] > 0
    assert "claims no guarantee" in capsys.readouterr().err

    # The same model presented as (0.1, 1e-5)-DP is refuted: exit code 1, the report is still written.
    assert main([*argv, "--epsilon", "0.1", "--output", str(report_path)]) == 1
    assert json.loads(report_path.read_text())["verdict"] == "violation"
    assert "VIOLATION" in capsys.readouterr().err

    # --write-model-card adds one audit section under the trainer's card, and replaces it when run again.
    card_before = (out / "README.md").read_text()
    for _ in range(2):
        assert main([*argv, "--write-model-card", "--output", str(report_path)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith(card_before.rstrip("\n")) and card.count("## Empirical privacy audit") == 1
    assert "| Canary membership inference: AUC |" in card and "claims no guarantee" in card
    assert "Extraction, heldout sequences (8-token prefix → 8 tokens)" in card


def test_audit_commands_refuse_bad_input_and_write_nothing(tmp_path, tiny_model_dir, corpus, capsys):
    train, _ = corpus
    canaries = tmp_path / "canaries.jsonl"
    assert main(["audit", "canaries", "--model", str(tiny_model_dir), "--num-canaries", "10", "--output",
                 str(canaries)]) == 0  # fmt: skip
    report = tmp_path / "report.json"
    cases = [
        (["audit", "canaries", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "c.jsonl")], "nope"),
        (["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(tmp_path / "missing.jsonl")], "missing"),
        (["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(train)], "not a canary file"),
        (["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(canaries), "--heldout-file", str(train)],
         "--heldout-file needs --train-file"),
        (["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(canaries), "--epsilon", "-1"],
         "--epsilon must be positive"),
        (["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(canaries), "--guesses", "9"],
         "guesses_per_side"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main([*argv, "--output", str(report)] if argv[1] == "run" else argv) == 2, argv
        assert message in capsys.readouterr().err
        assert not report.exists() and not (tmp_path / "c.jsonl").exists()
    # A canary file drawn for a larger vocabulary than the model's is refused by train and audit run alike.
    big = tmp_path / "big.jsonl"
    big.write_text(canaries.read_text().replace('"vocab_size": 512', '"vocab_size": 1024', 1))
    assert main(["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(big)]) == 2
    assert "drawn from 1024 token ids" in capsys.readouterr().err
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(train), "--canary-file", str(big),
                 "--output-dir", str(tmp_path / "o"), "--noise-multiplier", "1", "--max-steps", "1", *TRAIN_FLAGS])  # fmt: skip
    assert code == 2 and "drawn from 1024 token ids" in capsys.readouterr().err
    assert main(["audit"]) == 2


def test_audit_run_warns_that_shuffle_is_not_add_remove(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / DP_STATE_NAME).write_text(
        json.dumps({"epsilon": 3.0, "target_delta": 1e-6, "noise_multiplier": 1.1, "sampling": "shuffle"})
    )
    canaries = tmp_path / "canaries.jsonl"
    assert main(["audit", "canaries", "--model", str(model), "--num-canaries", "20", "--output", str(canaries)]) == 0
    report = tmp_path / "r.json"
    argv = ["audit", "run", "--model", str(model), "--canaries", str(canaries), "--exposure-references", "0"]
    assert main([*argv, "--output", str(report)]) == 0
    data = json.loads(report.read_text())
    assert (data["claimed_epsilon"], data["delta"], data["verdict"]) == (3.0, 1e-6, "consistent")
    assert "zero-out adjacency" in capsys.readouterr().err

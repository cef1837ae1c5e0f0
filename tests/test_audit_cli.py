"""`vaultgemma-hf audit canaries` → `vaultgemma-hf train --canary-file` → `vaultgemma-hf audit run`, end to end."""

from __future__ import annotations

import json

import pytest

from vaultgemma_hf.cli.main import main
from vaultgemma_hf.data import read_documents
from vaultgemma_hf.data.packing import pack_documents
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


def test_audit_commands_end_to_end(tmp_path, tiny_model_dir, corpus, capsys, monkeypatch):
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
            str(canaries), "--train-file", str(train), "--heldout-file", str(heldout),
            "--prefix-len", "8", "--suffix-len", "8", "--exposure-references", "100", "--seed", "0"]  # fmt: skip
    assert main([*argv, "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["claimed_epsilon"] == "inf" and report["verdict"] == "non_private"  # read from dp_state.json
    assert report["delta"] == state["target_delta"]
    assert report["canaries"]["num_included"] == num_included
    assert report["canaries"]["membership_inference"]["auc"] > 0.9
    assert report["extraction"]["heldout"]["num_tested"] > 0
    # The training sequences are packed as in training: --seq-len defaults to the run's (32, from dp_state.json).
    packed = pack_documents(read_documents(str(train))[0], tokenizer, seq_len=state["seq_len"])
    assert state["seq_len"] == 32 and report["training_data"]["num_members"] == len(packed)
    err = capsys.readouterr().err
    assert "claims no guarantee" in err and "may not be this run's" not in err
    # The wrong training file (or canary file) for this run is pointed out.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(heldout.read_text().splitlines(keepends=True)[:10]))
    assert main([*argv, "--train-file", str(other), "--output", str(report_path)]) == 0
    assert "may not be this run's" in capsys.readouterr().err

    # The same model presented as (0.1, 1e-5)-DP is refuted: exit code 3, the report is still written.
    assert main([*argv, "--epsilon", "0.1", "--output", str(report_path)]) == 3
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

    # A usage error with --write-model-card touches neither the card nor the report.
    report_path.unlink()
    assert main([*argv, "--write-model-card", "--guesses", "31", "--output", str(report_path)]) == 2
    assert (out / "README.md").read_text() == card and not report_path.exists()
    # A card that cannot be written after the audit: the report stands, and so does the verdict's exit code.
    import vaultgemma_hf.atomic_files as atomic_files

    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(atomic_files, "atomic_write_text", refuse)
    capsys.readouterr()
    assert main([*argv, "--epsilon", "0.1", "--write-model-card", "--output", str(report_path)]) == 3
    assert json.loads(report_path.read_text())["verdict"] == "violation"
    assert "the model card is not: read-only file system" in capsys.readouterr().err
    assert (out / "README.md").read_text() == card


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
         "--guesses: each value must be at most 5"),
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
    # An existing canary file (the coins of a run perhaps already trained) is not replaced without --overwrite.
    before = canaries.read_text()
    make = ["audit", "canaries", "--model", str(tiny_model_dir), "--num-canaries", "10", "--output", str(canaries)]
    assert main(make) == 2 and "--overwrite" in capsys.readouterr().err and canaries.read_text() == before
    assert main([*make, "--overwrite"]) == 0 and canaries.read_text() != before
    nested = tmp_path / "a" / "b" / "c.jsonl"
    assert main([*make[:-1], str(nested)]) == 0 and load_canaries(nested)
    # A BOS outside the vocabulary is refused when the file is read.
    header, *rest = canaries.read_text().splitlines()
    bad_bos = tmp_path / "bad_bos.jsonl"
    bad_bos.write_text(
        "\n".join([header.replace('"bos_token_id": 2', '"bos_token_id": 100000')]
                  + [line.replace('"token_ids": [2,', '"token_ids": [100000,') for line in rest]) + "\n"
    )  # fmt: skip
    assert main(["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(bad_bos)]) == 2
    assert "bos_token_id must be null or a token id below vocab_size" in capsys.readouterr().err
    assert main(["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(canaries), "--output",
                 str(canaries)]) == 2  # fmt: skip
    assert "would overwrite the canary file" in capsys.readouterr().err and load_canaries(canaries)
    for name in ("README.md", "config.json"):  # e.g. --output <model>/README.md with --write-model-card
        target = tiny_model_dir / name
        before = target.read_bytes() if target.exists() else None
        argv = ["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(canaries), "--output", str(target)]
        assert main([*argv, "--write-model-card"]) == 2
        assert "would overwrite a file of the audited model" in capsys.readouterr().err
        assert (target.read_bytes() if target.exists() else None) == before


@pytest.fixture
def model_with_state(tmp_path, tiny_model_dir):
    """A copy of the tiny model with a dp_state.json written by the test, and canaries drawn for it."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    canaries = tmp_path / "canaries.jsonl"
    assert main(["audit", "canaries", "--model", str(model), "--num-canaries", "20", "--output", str(canaries)]) == 0

    def run(state, *extra: str):
        (model / DP_STATE_NAME).write_text(json.dumps(state))
        report = tmp_path / "r.json"
        report.unlink(missing_ok=True)
        argv = ["audit", "run", "--model", str(model), "--canaries", str(canaries), "--exposure-references", "0"]
        code = main([*argv, *extra, "--output", str(report)])
        return code, (json.loads(report.read_text()) if report.exists() else None)

    return run


def test_audit_run_shuffle_claim_is_not_comparable(model_with_state, capsys):
    state = {"epsilon": 3.0, "target_delta": 1e-6, "noise_multiplier": 1.1, "sampling": "shuffle"}
    code, data = model_with_state(state, "--dtype", "bfloat16")
    assert code == 0 and (data["claimed_epsilon"], data["delta"], data["verdict"]) == (3.0, 1e-6, "not_comparable")
    assert "zero-out adjacency" in capsys.readouterr().err


def test_audit_run_reads_the_claim_from_dp_state(model_with_state, capsys):
    import dp_accounting

    # A claim at another δ is recomputed from the saved accountant state (oracle: dp_accounting's event by hand).
    saved = {"format_version": 1, "accountant": "pld", "sampling": "poisson", "noise_multiplier": 0.8,
             "sampling_rate": 0.05, "dataset_size": 640, "max_batch_size": None, "logical_batch_size": 32,
             "steps": 400, "dp_accounting_version": "0.6.0"}  # fmt: skip
    state = {
        "epsilon": 10.7,
        "target_delta": 1e-5,
        "noise_multiplier": 0.8,
        "sampling": "poisson",
        "accountant": saved,
    }
    code, data = model_with_state(state, "--delta", "1e-8")  # (δ where dp_accounting's float64 PLD is reliable)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(0.8)), 400
    )
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(event)
    assert code == 0 and data["delta"] == 1e-8
    # rel 1e-6: at this (δ, T) our accountant composes in 80-bit precision with a round-off margin (an upper bound on
    # the exact composition, tests/test_accounting_oracles.py), dp_accounting in float64: they differ by ~1e-7
    assert data["claimed_epsilon"] == pytest.approx(accountant.get_epsilon(1e-8), rel=1e-6)
    assert data["claimed_epsilon"] > 14 and "recomputed from the saved accountant" in capsys.readouterr().err
    # --epsilon is the user's own claim; its δ defaults to the state's.
    code, data = model_with_state(state, "--epsilon", "5")
    assert code == 0 and (data["claimed_epsilon"], data["delta"]) == (5.0, 1e-5)

    # Malformed or unusable states are usage errors (exit 2, nothing written), never a silent "no guarantee".
    for bad, message in [
        ({"noise_multiplier": 1.1, "target_delta": 1e-5}, "'epsilon' must be a number"),
        ({"epsilon": None, "noise_multiplier": 1.1, "target_delta": 1e-5}, "'epsilon' must be a number"),
        ({"epsilon": 0.0, "noise_multiplier": 1.1, "target_delta": 1e-5}, "took no DP step"),
        ({"epsilon": 2.0, "noise_multiplier": None, "target_delta": 1e-5}, "'noise_multiplier' must be a number"),
        ({"epsilon": 2.0, "noise_multiplier": 1.1, "target_delta": "x"}, "'target_delta' must be a number"),
        ([1, 2], "expected a JSON object"),
    ]:
        code, data = model_with_state(bad)
        assert (code, data) == (2, None) and message in capsys.readouterr().err, bad
    code, data = model_with_state({"epsilon": 2.0, "noise_multiplier": 1.1, "target_delta": 1e-5}, "--delta", "1e-9")
    assert (code, data) == (2, None) and "no accountant state" in capsys.readouterr().err
    # A non-private control run (σ = 0) claims nothing.
    code, data = model_with_state({"epsilon": "inf", "noise_multiplier": 0.0, "target_delta": 1e-5})
    assert code == 0 and data["verdict"] == "non_private"


def test_user_level_training_keeps_each_canary_a_user_of_its_own(tmp_path, tiny_model_dir, capsys):
    from vaultgemma_hf.fixtures import TINY_CORPUS

    lines = [line for line in TINY_CORPUS.read_text().splitlines() if line.strip()][:40]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps({"text": line, "user": i % 5}) + "\n" for i, line in enumerate(lines)))
    canaries = tmp_path / "canaries.jsonl"
    assert main(["audit", "canaries", "--model", str(tiny_model_dir), "--num-canaries", "12", "--length", "12",
                 "--output", str(canaries)]) == 0  # fmt: skip
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(data), "--user-field", "user",
                 "--privacy-unit", "user", "--canary-file", str(canaries), "--output-dir", str(out),
                 "--noise-multiplier", "1", "--max-steps", "1", *TRAIN_FLAGS, "--logical-batch-size", "4"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    state = json.loads((out / DP_STATE_NAME).read_text())
    assert state["privacy_unit"] == "user" and state["dataset_size"] == 5 + len(load_canaries(canaries).included)


@pytest.mark.parametrize("flag", ["--train-file", "--heldout-file"])
def test_audit_run_checks_data_files_before_loading_models(tmp_path, tiny_model_dir, capsys, monkeypatch, flag):
    """A missing or malformed data file was reported only after the model and the reference model were loaded."""

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the data files were checked")

    canaries = tmp_path / "canaries.jsonl"
    assert main(["audit", "canaries", "--model", str(tiny_model_dir), "--num-canaries", "4", "--length", "4"]
                + ["--output", str(canaries), "--seed", "0"]) == 0  # fmt: skip
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    good = tmp_path / "good.txt"
    good.write_text("one document\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    files = {"--train-file": str(good), "--heldout-file": str(good), flag: str(bad)}
    argv = ["audit", "run", "--model", str(tiny_model_dir), "--canaries", str(canaries), "--epsilon", "8"]
    assert main([*argv, *(part for item in files.items() for part in item)]) == 2
    assert "not valid JSON" in capsys.readouterr().err

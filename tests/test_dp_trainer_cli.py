"""`vaultgemma-hf train` and `DPTrainingArguments(plan=...)`."""

from __future__ import annotations

import json
import math
import re

import dp_accounting
import pytest

from vaultgemma_hf.cli.main import main
from vaultgemma_hf.data import read_documents
from vaultgemma_hf.data.packing import pack_documents
from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.planning.planner import PLAN_FORMAT, PLAN_FORMAT_VERSION
from vaultgemma_hf.trainer import DP_STATE_NAME, DPTrainer, DPTrainingArguments


@pytest.fixture
def corpus(tmp_path):
    from vaultgemma_hf.fixtures import TINY_CORPUS

    lines = [line for line in TINY_CORPUS.read_text().splitlines() if line.strip()][:120]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": line, "user": i % 7}) + "\n" for i, line in enumerate(lines)))
    return path


def test_train_command_end_to_end(tmp_path, tiny_model_dir, corpus, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--train-file",
            str(corpus),
            "--output-dir",
            str(out),
            "--target-epsilon",
            "2.0",
            "--target-delta",
            "1e-4",
            "--accountant",
            "rdp",
            "--logical-batch-size",
            "4",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--max-steps",
            "2",
            "--seq-len",
            "32",
            "--freeze",
            "model.embed_tokens.*",
            "--use-cpu",
            "--report-to",
            "none",
            "--save-strategy",
            "no",
            "--disable-tqdm",
            "true",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    state = json.loads((out / DP_STATE_NAME).read_text())
    assert state["accountant_steps"] == 2 and state["accountant_kind"] == "rdp"
    oracle = dp_accounting.rdp.RdpAccountant()
    oracle.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                state["sampling_rate"], dp_accounting.GaussianDpEvent(state["noise_multiplier"])
            ),
            2,
        )
    )
    assert state["epsilon"] == pytest.approx(oracle.get_epsilon(1e-4), rel=1e-9) and state["epsilon"] <= 2.0
    card = (out / "README.md").read_text()
    assert "`model.embed_tokens.weight`" in card and "one training sequence of 32 tokens" in card
    assert (out / "model.safetensors").is_file()
    assert f"epsilon={round_up(state['epsilon'])}" in captured.out  # rounded up, as the model card


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampling", "shuffle"], "allow_shuffled_batches_without_amplification"),
        (["--max-grad-norm", "1.0"], "max_grad_norm=1.0"),
        (["--noise-multiplier", "1.0"], "not both"),
    ],
)
def test_train_command_refuses_bad_options(tmp_path, tiny_model_dir, corpus, capsys, extra, message):
    argv = ["train", "--model", str(tiny_model_dir), "--train-file", str(corpus), "--output-dir", str(tmp_path)]
    code = main([*argv, "--target-epsilon", "2", "--logical-batch-size", "4", "--use-cpu", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_train_command_reports_missing_and_empty_files(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--target-epsilon", "2"]
    assert main([*argv, "--train-file", str(tmp_path / "nope.jsonl"), "--logical-batch-size", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*argv, "--train-file", str(empty), "--logical-batch-size", "4"]) == 2
    assert "contains no documents" in capsys.readouterr().err


def test_read_documents_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "u": 1}\n\n{"text": "b", "u": 2}\n')
    assert read_documents(str(path), user_field="u") == (["a", "b"], [1, 2])
    path.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        read_documents(str(path))
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_documents(str(txt)) == (["one", "two"], None)
    # a byte order mark (Excel, Notepad) is not part of the first document; \r\n and \r end lines, a form feed does not
    txt.write_bytes("\ufeffone \r\ntwo\rthree\x0cfour\n".encode())
    assert read_documents(str(txt))[0] == ["one", "two", "three\x0cfour"]
    path.write_bytes('\ufeff{"text": "a"}\n'.encode())
    assert read_documents(str(path))[0] == ["a"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.jsonl", '{"text": null}\n', "'text' field is a NoneType, not a string"),  # was trained on as "None"
        ("d.jsonl", '{"text": 3}\n', "'text' field is a int, not a string"),
        ("d.jsonl", '["a"]\n', "no 'text' field"),
        ("d.txt", b"caf\xe9\n", "d.txt:1: not valid UTF-8"),
        ("d.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', "d.jsonl:2: not valid UTF-8"),
        ("d.txt", "\n \n", "contains no documents"),
        ("d.csv", "a\n", "Unsupported data file type '.csv'"),
    ],
)
def test_read_documents_refuses_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=re.escape(message)):
        read_documents(path)


def test_read_documents_user_ids_need_jsonl(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one\n")
    with pytest.raises(ValueError, match="need a .jsonl data file"):
        read_documents(path, user_field="user")


# --------------------------------------------------------------------------------------------------- plans
def _write_plan(path, *, dataset_size, seq_len, batch, steps, sigma, delta=1e-3):
    q = batch / dataset_size
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    epsilon = accountant.get_epsilon(delta)
    plan = {
        "format": PLAN_FORMAT,
        "format_version": PLAN_FORMAT_VERSION,
        "target_epsilon": epsilon * 1.01,
        "target_delta": delta,
        "dataset_size": dataset_size,
        "seq_len": seq_len,
        "sampling": "poisson",
        "accountant": "pld",
        "recommended": 0,
        "rows": [
            {
                "logical_batch_size": batch,
                "steps": steps,
                "noise_multiplier": sigma,
                "epsilon": epsilon,
                "delta": delta,
                "sampling_rate": q,
                "status": "ok",
            }
        ],
    }
    path.write_text(json.dumps(plan))
    return epsilon * 1.01


def test_plan_fills_arguments_and_rejects_conflicts(tmp_path):
    plan = tmp_path / "plan.json"
    target = _write_plan(plan, dataset_size=10, seq_len=16, batch=2, steps=3, sigma=2.0)
    args = DPTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, plan=str(plan))
    assert (args.logical_batch_size, args.max_steps, args.noise_multiplier) == (2, 3, 2.0)
    assert (args.target_epsilon, args.target_delta, args.sampling, args.accountant) == (target, 1e-3, "poisson", "pld")
    same = DPTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, plan=str(plan), max_steps=3)
    assert same.max_steps == 3
    with pytest.raises(ValueError, match=r"logical_batch_size=4 \(plan: 2\)"):
        DPTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, plan=str(plan), logical_batch_size=4)
    with pytest.raises(ValueError, match=r"accountant='rdp' \(plan: 'pld'\)"):
        DPTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, plan=str(plan), accountant="rdp")


def test_trainer_checks_the_plan_against_the_data(tmp_path, tiny_kwargs):
    import transformers

    docs = [[5 + i] * 15 for i in range(10)]
    dataset = pack_documents(docs, seq_len=16, eos_token_id=1, cross_document_boundaries=False)
    assert len(dataset) == 10
    model = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**tiny_kwargs()))
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)

    good = tmp_path / "good.json"
    target = _write_plan(good, dataset_size=10, seq_len=16, batch=2, steps=3, sigma=2.0)
    trainer = DPTrainer(model=model, args=DPTrainingArguments(**common, plan=str(good)), train_dataset=dataset)
    trainer.setup_privacy()
    assert trainer.noise_multiplier == 2.0 and trainer._dp_budget_steps == 3
    assert trainer.target_delta == 1e-3 and math.isclose(trainer.args.target_epsilon, target)

    other_size = tmp_path / "size.json"
    _write_plan(other_size, dataset_size=20, seq_len=16, batch=2, steps=3, sigma=2.0)
    trainer = DPTrainer(model=model, args=DPTrainingArguments(**common, plan=str(other_size)), train_dataset=dataset)
    with pytest.raises(ValueError, match="plan was made for a training set of 20"):
        trainer.setup_privacy()

    other_len = tmp_path / "len.json"
    _write_plan(other_len, dataset_size=10, seq_len=32, batch=2, steps=3, sigma=2.0)
    trainer = DPTrainer(model=model, args=DPTrainingArguments(**common, plan=str(other_len)), train_dataset=dataset)
    with pytest.raises(ValueError, match="sequences of 32 tokens"):
        trainer.setup_privacy()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.csv", "a,b\n", "Unsupported data file type '.csv'"),
        ("data.jsonl", "not json\n", "not valid JSON"),
        ("nope.jsonl", None, "does not exist"),
    ],
)
def test_train_command_checks_data_files_before_loading_the_model(
    tmp_path, tiny_model_dir, capsys, monkeypatch, name, content, message
):
    """A bad --train-file or --eval-file was reported only after the weights were loaded (minutes for the 1B model)."""

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the data files were checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    good = tmp_path / "good.txt"
    good.write_text("one document\n")
    bad = tmp_path / name
    if content is not None:
        bad.write_text(content)
    argv = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"), "--target-epsilon", "2"]
    argv += ["--logical-batch-size", "1", "--use-cpu"]
    assert main([*argv, "--train-file", str(bad)]) == 2
    assert message in capsys.readouterr().err
    assert main([*argv, "--train-file", str(good), "--eval-file", str(bad)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

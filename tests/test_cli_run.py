"""`vaultgemma-hf run` and `vaultgemma-hf env` on the embedded tiny model."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoTokenizer

from vaultgemma_hf import VaultGemmaForCausalLM
from vaultgemma_hf.cli.main import main


def expected_generation(model_dir, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation computed directly with generate() (the oracle for the CLI)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = VaultGemmaForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_run_reads_stdin_lines(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\n\nCustomer Kim in\n"))
    assert main(["run", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        expected_generation(tiny_model_dir, "Patient Alex reported", 6),
        expected_generation(tiny_model_dir, "Customer Kim in", 6),
    ]


def test_run_jsonl_to_json_file(tmp_path, tiny_model_dir):
    prompts = ["Student Noor at", "Teacher note:"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"text": p}) for p in prompts) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["run", "--input", str(src), "--output", str(out), "--format", "json", "--max-new-tokens", "5"]
    assert main([*args, "--batch-size", "2", "--progress", "always"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        assert record["generated_text"] == expected_generation(tiny_model_dir, record["prompt"], 5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_run_continuation_only(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\n"))
    assert main(["run", "--max-new-tokens", "4", "--continuation-only"]) == 0
    full = expected_generation(tiny_model_dir, "Patient Alex reported", 4)
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed and full.endswith(printed.strip())


@pytest.mark.parametrize(
    "argv, stdin, message",
    [
        (["run", "--model", "/does/not/exist"], "hi\n", "no config.json"),
        (["run", "--task", "text2text-generation"], "hi\n", "decoder-only causal LM: use --task text-generation"),
        (["run", "--task", "fill-mask"], "hi\n", "unsupported"),
        (["run"], "\n\n", "no prompts"),
        (["run", "--input", "/no/such/file.txt"], "", "no such file"),
        (["run", "--input-format", "jsonl"], '{"x": 1}\n', 'no string "text"'),
        (["run", "--max-new-tokens", "0"], "hi\n", "must be positive"),
    ],
)
def test_run_errors_are_clear(monkeypatch, capsys, tmp_path, argv, stdin, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out = tmp_path / "never.txt"
    assert main([*argv, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_run_refuses_prompt_longer_than_positions(tmp_path, capsys, tiny_model_dir):
    long_prompt = " ".join(["Patient Alex reported fever"] * 400)
    src = tmp_path / "long.txt"
    src.write_text(long_prompt + "\n")
    out = tmp_path / "out.txt"
    assert main(["run", "--input", str(src), "--output", str(out), "--max-new-tokens", "2"]) == 2
    assert "max_position_embeddings=1024" in capsys.readouterr().err
    assert not out.exists()


def test_env_prints_versions(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"].startswith(torch.__version__[:4])
    assert info["Auto* 'vaultgemma' resolves to"] in {"transformers", "vaultgemma_hf"}


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "train", "plan", "convert", "env"):
        assert command in text

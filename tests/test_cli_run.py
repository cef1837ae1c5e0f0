"""`vaultgemma-hf run` and `vaultgemma-hf env` on the embedded tiny model."""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import threading

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
    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\nCustomer Kim in\n"))
    assert main(["run", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        expected_generation(tiny_model_dir, "Patient Alex reported", 6),
        expected_generation(tiny_model_dir, "Customer Kim in", 6),
    ]


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_run_blank_lines_keep_output_aligned(monkeypatch, capsys, tiny_model_dir, batch_size):
    """A blank input line gives an empty output line, so output line i answers input line i."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\nPatient Alex reported\n\n  \nCustomer Kim in\nTeacher note:\n"))
    assert main(["run", "--max-new-tokens", "4", "--batch-size", batch_size]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines == [
        "",
        expected_generation(tiny_model_dir, "Patient Alex reported", 4),
        "",
        "",
        expected_generation(tiny_model_dir, "Customer Kim in", 4),
        expected_generation(tiny_model_dir, "Teacher note:", 4),
        "",  # after the final newline
    ]


def test_run_blank_lines_in_json_output(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\n\n"))
    assert main(["run", "--max-new-tokens", "3", "--format", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2
    assert records[0]["prompt"] == "Patient Alex reported"
    assert records[1] == {"prompt": "", "generated_text": ""}


def test_run_input_dash_is_stdin(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\n"))
    assert main(["run", "--input", "-", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [expected_generation(tiny_model_dir, "Patient Alex reported", 4)]


def _line_reader(stream) -> queue.Queue:
    """Reads `stream` line by line on a daemon thread, so that the test can wait for a line with a timeout."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_run_streams_stdin(tmp_path, tiny_model_dir):
    """Each result is printed as soon as its prompt line arrives, not when stdin is closed."""
    stderr = open(tmp_path / "stderr.txt", "w+b")  # a file, not a pipe: it cannot fill up and block the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultgemma_hf.cli", "run", "--max-new-tokens", "4", "--batch-size", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        encoding="utf-8",
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # the CLI must flush by itself
    )
    try:
        out = _line_reader(proc.stdout)
        proc.stdin.write("Patient Alex reported\n")
        proc.stdin.flush()
        try:
            first = out.get(timeout=90)
        except queue.Empty:
            pytest.fail("no result before stdin was closed: input is not streamed")
        assert proc.poll() is None  # still waiting for more input
        assert first.rstrip("\n") == expected_generation(tiny_model_dir, "Patient Alex reported", 4)
        proc.stdin.write("Customer Kim in\n")
        proc.stdin.flush()
        second = out.get(timeout=60)
        assert second.rstrip("\n") == expected_generation(tiny_model_dir, "Customer Kim in", 4)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert out.get(timeout=10) is None  # nothing more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_run_progress_bar_on_stderr(tmp_path, monkeypatch, capsys):
    src = tmp_path / "prompts.txt"
    src.write_text("Patient Alex reported\n\nCustomer Kim in\n")
    assert main(["run", "--input", str(src), "--max-new-tokens", "2", "--progress", "always"]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "prompt" in err  # known total for a file: its non-blank lines

    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\nCustomer Kim in\n"))
    assert main(["run", "--max-new-tokens", "2", "--progress", "always"]) == 0
    err = capsys.readouterr().err
    assert "2prompt" in err  # unknown total for stdin: a count, no percentage

    monkeypatch.setattr("sys.stdin", io.StringIO("Patient Alex reported\n"))
    assert main(["run", "--max-new-tokens", "2", "--progress", "never"]) == 0
    assert "prompt" not in capsys.readouterr().err


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
        (["run", "--max-new-tokens", "0"], "hi\n", "--max-new-tokens 0: must be a positive integer"),
    ],
)
def test_run_errors_are_clear(monkeypatch, capsys, tmp_path, argv, stdin, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out = tmp_path / "never.txt"
    assert main([*argv, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "foo"], "--device foo: not a device"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--device", "xpu"], "--device xpu"),
        (["--num-beams", "0"], "--num-beams 0: must be a positive integer"),
        (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
        (["--max-new-tokens", "-3"], "--max-new-tokens -3: must be a positive integer"),
        (["--do-sample", "--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k -1: must be 0"),
        (["--do-sample", "--temperature", "0"], "--temperature 0.0: must be a positive number"),
        (["--temperature", "nan"], "--temperature nan: must be a positive number"),
        (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be a positive number"),
    ],
)
def test_run_bad_flags_fail_before_loading(monkeypatch, capsys, tmp_path, flags, message):
    """Bad flags: exit code 2, one line naming the flag, no model loaded, nothing written."""
    if flags[:2] == ["--device", "cuda:99"] and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a GPU 99")
    if flags[:2] == ["--device", "xpu"] and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")

    def no_loading(_args):
        raise AssertionError("the model was loaded despite a bad flag")

    monkeypatch.setattr("vaultgemma_hf.cli.run._load_pipeline", no_loading)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    out = tmp_path / "never.txt"
    assert main(["run", *flags, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaultgemma-hf run: ") and err.count("\n") == 1  # one line, no traceback
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_run_device_mps_unavailable(monkeypatch, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["run", "--device", "mps"]) == 2
    assert "--device mps: MPS is not available" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["directory", "under a file"])
def test_run_bad_output_path_fails_before_loading(monkeypatch, capsys, tmp_path, kind):
    monkeypatch.setattr("vaultgemma_hf.cli.run._load_pipeline", lambda _args: pytest.fail("model loaded"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("keep")
    target = tmp_path / "dir" if kind == "directory" else tmp_path / "file" / "out.txt"
    assert main(["run", "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--output {target}:" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
    assert list((tmp_path / "dir").iterdir()) == [] and (tmp_path / "file").read_text() == "keep"


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

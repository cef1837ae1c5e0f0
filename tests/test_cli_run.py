"""`vaultgemma-hf run` and `vaultgemma-hf env` on the embedded tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

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


def test_run_output_to_a_pipe_writes_through_it(tmp_path):
    """`--output /dev/stdout` or a named pipe is written to, not replaced by a renamed temp file."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    src = tmp_path / "prompts.txt"
    src.write_text("Student Noor at\n")
    assert main(["run", "--input", str(src), "--output", str(fifo), "--max-new-tokens", "3"]) == 0
    reader.join(timeout=30)
    assert fifo.is_fifo() and received and received[0].startswith("Student Noor at")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fifo", "prompts.txt"]


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

    def no_loading(*_):
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
    monkeypatch.setattr("vaultgemma_hf.cli.run._load_pipeline", lambda *_: pytest.fail("model loaded"))
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
    err = capsys.readouterr().err
    assert "vaultgemma-hf run: input line 1: the prompt is 2000 tokens" in err
    assert "max_position_embeddings=1024" in err and "--truncate left" in err and "Traceback" not in err
    assert not out.exists()


# --- long prompts: --truncate, on a copy of the tiny model with few positions ---------------------------------------

SHORT_POSITIONS = 24
LONG_PROMPTS = [" ".join(["Patient Alex reported fever"] * 8), " ".join(["Customer Kim in the clinic"] * 6)]


@pytest.fixture
def short_model_dir(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with max_position_embeddings=SHORT_POSITIONS, so that a prompt of a line is already too long."""
    target = tmp_path / "short-model"
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = SHORT_POSITIONS
    (target / "config.json").write_text(json.dumps(config))
    return target


def expected_left_truncated(model_dir, prompt: str, max_new_tokens: int) -> str:
    """The oracle for --truncate left: <bos> and the prompt's last tokens, generated directly; the output keeps the
    whole prompt text followed by the continuation (as the pipeline returns it)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = VaultGemmaForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt)["input_ids"]
    keep = model.config.max_position_embeddings - max_new_tokens
    assert ids[0] == tokenizer.bos_token_id and len(ids) > keep
    kept = torch.tensor([[ids[0], *ids[len(ids) - keep + 1 :]]])
    with torch.no_grad():
        out = model.generate(
            kept, attention_mask=torch.ones_like(kept), max_new_tokens=max_new_tokens, do_sample=False
        )
    return prompt + tokenizer.decode(out[0, keep:], skip_special_tokens=True)


@pytest.mark.parametrize("input_format", ["lines", "jsonl"])
def test_run_too_long_prompt_names_its_line(tmp_path, capsys, short_model_dir, input_format):
    """--truncate none (the default): one line naming the input line and --truncate left, exit 2, no --output."""
    prompts = ["Patient Alex reported", None, LONG_PROMPTS[0]]  # the long prompt is on input line 3
    src = tmp_path / "prompts.txt"
    if input_format == "lines":
        src.write_text("\n".join(p or "" for p in prompts) + "\n")
    else:  # blank lines are skipped in JSON Lines, line numbers still count them
        src.write_text("\n".join(json.dumps({"text": p}) if p else "" for p in prompts) + "\n")
    out = tmp_path / "out.txt"
    argv = ["run", "--model", str(short_model_dir), "--input", str(src), "--output", str(out), "--max-new-tokens", "4"]
    assert main([*argv, "--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("vaultgemma-hf run:")]
    assert line.startswith("vaultgemma-hf run: input line 3: the prompt is ")
    assert f"max_position_embeddings={SHORT_POSITIONS} minus --max-new-tokens 4" in line
    assert "give --truncate left" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "short-model"]


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_run_truncate_left(tmp_path, capsys, short_model_dir, batch_size):
    """--truncate left keeps <bos> and each long prompt's last tokens, so that prompt + new tokens fit; one warning
    per truncated prompt; batched generation (left padding) gives the same text as one prompt at a time."""
    src = tmp_path / "prompts.txt"
    src.write_text(f"{LONG_PROMPTS[0]}\nTeacher note:\n{LONG_PROMPTS[1]}\n")
    argv = ["run", "--model", str(short_model_dir), "--input", str(src), "--max-new-tokens", "4", "--truncate", "left"]
    assert main([*argv, "--batch-size", batch_size]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        expected_left_truncated(short_model_dir, LONG_PROMPTS[0], 4),
        expected_generation(short_model_dir, "Teacher note:", 4),
        expected_left_truncated(short_model_dir, LONG_PROMPTS[1], 4),
    ]
    warnings = [line for line in captured.err.splitlines() if line.startswith("vaultgemma-hf run: warning:")]
    keep = SHORT_POSITIONS - 4
    assert len(warnings) == 2
    assert warnings[0].startswith("vaultgemma-hf run: warning: input line 1: prompt truncated from ")
    assert warnings[1].startswith("vaultgemma-hf run: warning: input line 3: prompt truncated from ")
    assert all(f"to its last {keep} tokens" in line for line in warnings)


@pytest.mark.parametrize("truncate", ["none", "left"])
def test_run_max_new_tokens_over_positions(tmp_path, capsys, short_model_dir, truncate):
    """--max-new-tokens that leaves no room for a prompt fails up front (before any generation), naming the flag."""
    out = tmp_path / "out.txt"
    src = tmp_path / "prompts.txt"
    src.write_text("Teacher note:\n")
    argv = ["run", "--model", str(short_model_dir), "--input", str(src), "--output", str(out), "--truncate", truncate]
    assert main([*argv, "--max-new-tokens", str(SHORT_POSITIONS)]) == 2
    err = capsys.readouterr().err
    assert f"vaultgemma-hf run: --max-new-tokens {SHORT_POSITIONS}: leaves no room for a prompt" in err
    assert f"give at most {SHORT_POSITIONS - 1}" in err and "Traceback" not in err
    assert not out.exists()


# --- --model / --tokenizer as a Hub repo id in the local cache (never downloaded) ------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "acme/tiny-vaultgemma"


def cache_repo(cache: Path, repo_id: str, source: Path, files: tuple[str, ...] | None = None) -> Path:
    """Lays out `source`'s files as huggingface_hub caches a download of `repo_id` at revision main: blobs/<hash>,
    snapshots/<commit>/<file> linking to the blob, refs/main holding the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    for file in sorted(source.iterdir()):
        if files is not None and file.name not in files:
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """An offline Hugging Face cache in tmp_path holding REPO_ID (the tiny model); any Hub request fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache_repo(cache, REPO_ID, Path(tiny_model_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read from the environment at import time

    def no_hub(*_args, **_kwargs):
        raise AssertionError("the Hub was queried")

    for name in ("repo_info", "model_info", "list_repo_tree", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, no_hub)
    assert [repo.repo_id for repo in huggingface_hub.scan_cache_dir(cache).repos] == [REPO_ID]  # a valid layout
    return cache


def test_run_model_from_hub_cache(monkeypatch, capsys, hub_cache, tiny_model_dir):
    """--model owner/name[@revision] in the local cache generates the same text as the local directory."""
    prompts = "Patient Alex reported\nCustomer Kim in\n"
    argv = ["run", "--max-new-tokens", "5", "--batch-size", "2"]
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts))
    assert main([*argv, "--model", str(tiny_model_dir)]) == 0
    local = capsys.readouterr().out
    assert local.splitlines() == [
        expected_generation(tiny_model_dir, "Patient Alex reported", 5),
        expected_generation(tiny_model_dir, "Customer Kim in", 5),
    ]
    for model in (REPO_ID, f"{REPO_ID}@main", f"{REPO_ID}@{COMMIT}"):
        monkeypatch.setattr("sys.stdin", io.StringIO(prompts))
        assert main([*argv, "--model", model]) == 0
        assert capsys.readouterr().out == local
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts))
    assert main([*argv, "--model", str(tiny_model_dir), "--tokenizer", REPO_ID]) == 0
    assert capsys.readouterr().out == local


def test_run_model_from_hub_cache_env(tmp_path, tiny_model_dir):
    """The cache is found through $HF_HUB_CACHE, as huggingface_hub reads it, in a fresh process."""
    cache = tmp_path / "hub"
    cache_repo(cache, REPO_ID, Path(tiny_model_dir))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vaultgemma_hf.cli", "run", "--model", REPO_ID, "--max-new-tokens", "4"],
        input="Patient Alex reported\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [expected_generation(tiny_model_dir, "Patient Alex reported", 4)]


NOT_CACHED = "no such local directory, and not in the local Hugging Face cache"


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (
            ["--model", "acme/missing"],
            [
                f"--model acme/missing: {NOT_CACHED}",
                "never downloads. Fetch it first with `hf download acme/missing`.",
            ],
        ),
        (["--model", f"{REPO_ID}@v2"], [NOT_CACHED, f"`hf download {REPO_ID} --revision v2`"]),
        (["--model", "acme/no-config"], ["has no config.json, and this command never downloads"]),
        (["--tokenizer", "acme/missing"], [f"--tokenizer acme/missing: {NOT_CACHED}"]),
        (["--model", "/does/not/exist"], ["--model /does/not/exist: no config.json there. Give a local model dir"]),
        (["--tokenizer", "/no/such/tokenizer"], ["--tokenizer /no/such/tokenizer: no such directory."]),
    ],
)
def test_run_model_not_cached(monkeypatch, capsys, tmp_path, hub_cache, tiny_model_dir, flags, fragments):
    """A repo id missing from the cache: exit 2, one line saying how to fetch it, before any model is loaded."""
    cache_repo(hub_cache, "acme/no-config", Path(tiny_model_dir), files=("model.safetensors",))
    monkeypatch.setattr("vaultgemma_hf.cli.run._load_pipeline", lambda *_: pytest.fail("model loaded"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    out = tmp_path / "never.txt"
    assert main(["run", *flags, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaultgemma-hf run: ") and err.count("\n") == 1  # one line, no traceback
    assert all(fragment in err for fragment in fragments), err
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


def test_run_help_documents_cache_and_truncate(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--truncate {none,left}" in text and "owner/name[@revision]" in text and "hf download" in text

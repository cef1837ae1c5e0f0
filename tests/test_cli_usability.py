"""Defects found by following the README and docs as a new user, each pinned by a test (tiny model, CPU)."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest

from vaultgemma_hf.cli._io import atomic_output
from vaultgemma_hf.cli._prompts import read_numbered_prompts
from vaultgemma_hf.cli.main import main


def _no_loading(*_):
    raise AssertionError("the model was loaded")


def test_version_flag(capsys):
    """`vaultgemma-hf --version` prints the package version, as transformers users expect of a console script."""
    from vaultgemma_hf import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vaultgemma-hf {__version__}"


def test_byte_order_mark_does_not_hide_jsonl():
    """A JSONL file saved with a UTF-8 BOM (Excel, Notepad) is still read as JSON Lines, not as plain prompts."""
    lines = ['\ufeff{"text": "Patient Alex reported"}\n'.encode(), b'{"text": "Customer Kim in"}\n']
    assert list(read_numbered_prompts(lines)) == [(1, "Patient Alex reported"), (2, "Customer Kim in")]
    text_lines = ['\ufeff{"text": "a"}\n']  # text streams (a replaced sys.stdin) too
    assert list(read_numbered_prompts(text_lines)) == [(1, "a")]
    assert list(read_numbered_prompts(["\ufeffPatient\n"], "lines")) == [(1, "Patient")]


def test_run_reads_jsonl_with_byte_order_mark(tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "Patient Alex reported"}\n')
    assert main(["run", "--input", str(src), "--max-new-tokens", "1", "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == "Patient Alex reported"


def test_run_non_utf8_input_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Latin-1 text gives one line naming the input line (exit 2, nothing loaded), not a UnicodeDecodeError."""
    monkeypatch.setattr("vaultgemma_hf.cli.run._load_pipeline", _no_loading)
    src = tmp_path / "prompts.txt"
    src.write_bytes(b"Patient \xe9 Alex\n")
    out = tmp_path / "out.txt"
    assert main(["run", "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaultgemma-hf run: input line 1 is not valid UTF-8") and err.count("\n") == 1
    assert "0xe9" in err and not out.exists()


def test_non_utf8_line_is_named_after_valid_lines():
    lines = [b"ok\n", b"Patient \xe9\n"]
    items = read_numbered_prompts(lines, "lines")
    assert next(items) == (1, "ok")
    with pytest.raises(ValueError, match="input line 2 is not valid UTF-8"):
        next(items)


@pytest.mark.parametrize("flags", [["--temperature", "0.7"], ["--top-k", "5"], ["--top-p", "0.9"]])
def test_run_sampling_flags_need_do_sample(monkeypatch, capsys, flags):
    """Without --do-sample, generate() decodes greedily and only warns that these flags are ignored: refuse them."""
    monkeypatch.setattr("vaultgemma_hf.cli.run._load_pipeline", _no_loading)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["run", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flags[0]}: only used when sampling; add --do-sample" in err


def test_run_progress_never_hides_loading_bar(monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr("sys.stdin", io.StringIO("Patient\n"))
    assert main(["run", "--max-new-tokens", "1", "--progress", "never"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_output_gets_a_normal_file_mode(tmp_path, umask_022):
    """`--output` files were created 0600 (mkstemp's mode) while the same command with `>` gives 0644."""
    target = tmp_path / "out.jsonl"
    with atomic_output(target) as stream:
        stream.write("x\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    target.chmod(0o640)  # replacing a file keeps its permissions, as open(path, "w") does
    with atomic_output(target) as stream:
        stream.write("y\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == "y\n"


def test_run_text_field_selects_the_prompt_key(tmp_path, capsys):
    """`--text-field` (as in `train`, `plan` and `audit run`) picks the JSONL key; a missing key lists the keys."""
    src = tmp_path / "notes.jsonl"
    src.write_text('{"id": 1, "note": "Patient Alex reported"}\n')
    assert main(["run", "--input", str(src), "--text-field", "note", "--max-new-tokens", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "Patient Alex reported"


def test_missing_jsonl_field_names_the_keys_without_a_wrong_hint():
    """A JSONL record without the field used to suggest `--input-format lines`, which would send raw JSON as prompts."""
    with pytest.raises(ValueError) as info:
        list(read_numbered_prompts(['{"text": "a"}\n', '{"id": 3, "body": "b"}\n']))
    message = str(info.value)
    assert 'input line 2 has no string "text" or "prompt" field (its keys: id, body)' in message
    assert "--text-field" in message and "--input-format lines" not in message
    with pytest.raises(ValueError, match='no string "note" field'):
        list(read_numbered_prompts(['{"text": "a"}\n'], text_field="note"))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["convert", "src", "dst", "--dtype", "bfloat16"], "bf16"),  # run's spelling, given to convert
        (["convert", "src", "dst", "--dtype", "bf16"], "bf16"),
        (["run", "--dtype", "bf16"], "bfloat16"),  # convert's spelling, given to run
        (["audit", "run", "--model", "m", "--canaries", "c", "--dtype", "fp16"], "float16"),
    ],
)
def test_dtype_flag_accepts_both_spellings(argv, expected):
    """`convert --dtype` took only bf16/fp32 while `run` and `audit run` took only bfloat16/float32."""
    from vaultgemma_hf.cli.main import build_parser

    assert build_parser(argv).parse_args(argv).dtype == expected


def test_every_documented_command_line_parses():
    """Each `vaultgemma-hf ...` line of the README's and the docs' bash blocks uses flags that exist."""
    import re
    import shlex
    from pathlib import Path

    from vaultgemma_hf.cli.main import build_parser

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "docs" / "source" / "en").rglob("*.md"))]
    checked = []
    for path in files:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if "vaultgemma-hf " not in line or "..." in line or line.startswith(("pip ", "#")):
                    continue  # an install line, or a command with elided flags
                argv = shlex.split(line.split("vaultgemma-hf ", 1)[1])
                try:
                    build_parser(argv).parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{path.name}: `{line}` does not parse")
                checked.append(argv[0])
    assert {"run", "env", "plan", "convert", "audit"} <= set(checked)

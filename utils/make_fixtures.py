#!/usr/bin/env python
"""Writes the small fixtures committed under `src/vaultgemma_hf/fixtures/` (no network needed).

* `tiny_corpus.txt`: a deterministic synthetic corpus of short "records" (invented, no real data), one per line.
* `tiny-random-vaultgemma/`: a tokenizer trained on it (BPE over "▁"-joined words as in Gemma, Gemma-style special tokens
  <pad>=0 <eos>=1 <bos>=2 <unk>=3, `<bos>` prepended) and a randomly initialised VaultGemma with the released
  architecture at a tiny width (all layers full attention, tied embeddings, no softcap, 1024 positions).

It is the embedded default of the CLI, the demo and the tests. Re-run after changing the model code:

    python utils/make_fixtures.py            # rewrites the fixtures (seeded, deterministic)
    python utils/make_fixtures.py --check    # exits 1 if the committed fixtures differ from a fresh build
                                             # (weights, corpus, config/generation/tokenizer JSON; see `differences`)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM  # noqa: E402

FIXTURES = ROOT / "src" / "vaultgemma_hf" / "fixtures"
MODEL_DIR = FIXTURES / "tiny-random-vaultgemma"
CORPUS = FIXTURES / "tiny_corpus.txt"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB_SIZE = 512

TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=32,
    max_position_embeddings=1024,
)


def make_corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Invented records in a few registers (clinic, bank, school), deterministic for a seed."""
    rng = random.Random(seed)
    names = ["Alex", "Sam", "Robin", "Kim", "Noor", "Jordan", "Mika", "Lee", "Ari", "Dana"]
    towns = ["Northfield", "Riverton", "Lakeside", "Hillcrest", "Easton", "Westbrook"]
    templates = [
        "Patient {n} from {t} reported {s} for {d} days and was advised to {a}.",
        "Follow-up call with {n}: the {s} improved after {d} days; next visit in {t} clinic.",
        "Customer {n} in {t} disputed a payment of {m} dollars made {d} days ago.",
        "Account review for {n}: {d} transfers flagged in {t}, total {m} dollars.",
        "Student {n} at {t} school scored {m} points and needs help with {c}.",
        "Teacher note: {n} finished the {c} project {d} days early.",
    ]
    fills = {
        "s": ["headache", "cough", "fever", "back pain", "fatigue", "rash"],
        "a": ["rest", "drink water", "take the prescribed dose", "return if it worsens"],
        "c": ["algebra", "reading", "chemistry", "history", "writing"],
    }
    lines = []
    for _ in range(num_lines):
        template = rng.choice(templates)
        lines.append(
            template.format(
                n=rng.choice(names),
                t=rng.choice(towns),
                d=rng.randint(1, 30),
                m=rng.randint(10, 990),
                s=rng.choice(fills["s"]),
                a=rng.choice(fills["a"]),
                c=rng.choice(fills["c"]),
            )
        )
    return lines


def make_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """Trains a small BPE tokenizer with Gemma's special-token ids and `<bos>` prepended."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Like Gemma's SentencePiece tokenizer: spaces become "▁", no space is prepended to the text, and decoding only
    # maps "▁" back to spaces (so a decoded continuation keeps its leading space).
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, (token, tokenizer.token_to_id(token))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )


def build(out_dir: Path) -> None:
    """Writes corpus and model directory under `out_dir` (same layout as FIXTURES)."""
    lines = make_corpus()
    (out_dir / CORPUS.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = make_tokenizer(lines)
    config = VaultGemmaConfig(**TINY_CONFIG)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    torch.manual_seed(0)
    model = VaultGemmaForCausalLM(config)
    # Give the zero-initialised norms some signal so that tests exercise the `1 + weight` convention.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.1)
    model_dir = out_dir / MODEL_DIR.name
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # The fixture is plain weights + config: drop the copied model code and its auto_map (tests that exercise
    # trust_remote_code save their own checkpoint).
    for path in model_dir.glob("*.py"):
        path.unlink()
    config_path = model_dir / "config.json"
    data = json.loads(config_path.read_text())
    data.pop("auto_map", None)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# JSON fields that legitimately differ between two builds of the same fixtures, so `--check` ignores them (at the top
# level of each file): `transformers_version` records whichever transformers release wrote the file (CI tests the
# newest 5.x and the 5.17 lower bound; both write otherwise identical files). Nothing else is ignored.
IGNORED_JSON_FIELDS = {"transformers_version"}


def _json_without_ignored(path: Path) -> object:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if key not in IGNORED_JSON_FIELDS}
    return data


def differences(fresh_root: Path, committed_root: Path) -> list[str]:
    """What differs between two fixture trees (the FIXTURES layout): one line per differing file, empty if none.

    Compares the corpus text, the model directory's file names, the weights (names, dtypes, values) and every JSON
    file (config, generation config, tokenizer, tokenizer config) as parsed data minus IGNORED_JSON_FIELDS.
    """
    from safetensors.torch import load_file

    found = []
    if (fresh_root / CORPUS.name).read_text(encoding="utf-8") != (committed_root / CORPUS.name).read_text(
        encoding="utf-8"
    ):
        found.append(f"{CORPUS.name}: text differs")
    fresh_dir, committed_dir = fresh_root / MODEL_DIR.name, committed_root / MODEL_DIR.name
    fresh_files = {path.name for path in fresh_dir.iterdir()}
    committed_files = {path.name for path in committed_dir.iterdir()}
    if fresh_files - committed_files:
        found.append(f"{MODEL_DIR.name}: missing {sorted(fresh_files - committed_files)}")
    if committed_files - fresh_files:
        found.append(f"{MODEL_DIR.name}: not in a fresh build {sorted(committed_files - fresh_files)}")
    for name in sorted(fresh_files & committed_files):
        fresh_path, committed_path = fresh_dir / name, committed_dir / name
        if name.endswith(".safetensors"):
            fresh, committed = load_file(fresh_path), load_file(committed_path)
            changed = sorted(fresh.keys() ^ committed.keys()) or [
                key
                for key in sorted(fresh)
                if fresh[key].dtype != committed[key].dtype or not torch.equal(fresh[key], committed[key])
            ]
            if changed:
                found.append(f"{MODEL_DIR.name}/{name}: tensors differ {changed}")
        elif name.endswith(".json"):
            fresh, committed = _json_without_ignored(fresh_path), _json_without_ignored(committed_path)
            if fresh != committed:
                if isinstance(fresh, dict) and isinstance(committed, dict):
                    keys = sorted(k for k in fresh.keys() | committed.keys() if fresh.get(k) != committed.get(k))
                    found.append(f"{MODEL_DIR.name}/{name}: fields differ {keys}")
                else:
                    found.append(f"{MODEL_DIR.name}/{name}: content differs")
        elif fresh_path.read_bytes() != committed_path.read_bytes():
            found.append(f"{MODEL_DIR.name}/{name}: bytes differ")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only compare a fresh build with the committed one.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp)
        if args.check:
            found = differences(tmp, FIXTURES)
            if not found:
                print("fixtures up to date")
                return 0
            print("fixtures differ from a fresh build (run utils/make_fixtures.py):")
            print("\n".join(f"  {line}" for line in found))
            return 1
        FIXTURES.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=FIXTURES, prefix=".staging-"))
        try:
            shutil.copytree(tmp, staged, dirs_exist_ok=True)
            if MODEL_DIR.exists():
                shutil.rmtree(MODEL_DIR)
            os.replace(staged / MODEL_DIR.name, MODEL_DIR)
            os.replace(staged / CORPUS.name, CORPUS)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    print(f"wrote {MODEL_DIR.relative_to(ROOT)} and {CORPUS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

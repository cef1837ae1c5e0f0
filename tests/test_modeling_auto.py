"""Auto* registration policy, trust_remote_code export, the text-generation pipeline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

import vaultgemma_hf
from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM, VaultGemmaModel

from conftest import tiny_config_kwargs

SRC = str(Path(vaultgemma_hf.__file__).resolve().parents[1])


def run_python(code: str, *, with_package: bool = True) -> str:
    """Runs code in a fresh interpreter (registration is global state); returns stdout, fails on error."""
    env_path = SRC if with_package else ""
    prelude = "import sys, os\nos.environ['HF_HUB_OFFLINE'] = '1'\n"
    if with_package:
        prelude += f"sys.path.insert(0, {env_path!r})\n"
    else:  # an environment where vaultgemma_hf is not importable at all
        prelude += textwrap.dedent(
            """
            import importlib.abc
            class _Block(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name == "vaultgemma_hf" or name.startswith("vaultgemma_hf."):
                        raise ModuleNotFoundError(name)
            sys.meta_path.insert(0, _Block())
            """
        )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def save_tiny(path: Path, cls=VaultGemmaForCausalLM) -> torch.nn.Module:
    torch.manual_seed(0)
    config_cls = VaultGemmaConfig if cls is VaultGemmaForCausalLM else transformers.VaultGemmaConfig
    model = cls(config_cls(**tiny_config_kwargs())).eval()
    model.save_pretrained(path)
    return model


def test_builtin_present_auto_keeps_builtin_and_our_config_maps_to_ours(tmp_path):
    assert vaultgemma_hf.AUTO_CLASSES_RESOLVE_TO == "transformers"
    save_tiny(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is transformers.VaultGemmaConfig
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is transformers.VaultGemmaForCausalLM
    assert type(AutoModelForCausalLM.from_config(VaultGemmaConfig(**tiny_config_kwargs()))) is VaultGemmaForCausalLM
    assert type(AutoModel.from_config(VaultGemmaConfig(**tiny_config_kwargs()))) is VaultGemmaModel


def test_override_makes_auto_resolve_to_ours(tmp_path):
    save_tiny(tmp_path)
    out = run_python(
        f"""
        os.environ["VAULTGEMMA_HF_OVERRIDE_AUTO"] = "1"
        import vaultgemma_hf
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        print(vaultgemma_hf.AUTO_CLASSES_RESOLVE_TO)
        print(type(AutoConfig.from_pretrained({str(tmp_path)!r})).__module__)
        print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__module__)
        print(type(AutoModel.from_pretrained({str(tmp_path)!r})).__module__)
        from transformers import pipeline
        from vaultgemma_hf.fixtures import TINY_MODEL_DIR
        print(type(pipeline("text-generation", model=str(TINY_MODEL_DIR)).model).__module__)
        """
    ).split()
    assert out[0] == "vaultgemma_hf"
    assert len(out) == 5 and all(module.startswith("vaultgemma_hf.models.vaultgemma") for module in out[1:]), out


def test_import_is_light_and_registration_follows_the_model_classes(tmp_path):
    # `import vaultgemma_hf` defers the registration only where it changes no lookup: torch is not imported
    # until a model class is, and importing one registers exactly as an eager import would.
    save_tiny(tmp_path)
    out = run_python(
        f"""
        import vaultgemma_hf
        print("torch" in sys.modules, "transformers" in sys.modules)
        from vaultgemma_hf.models.auto import OVERRIDE_ENV
        print(OVERRIDE_ENV == vaultgemma_hf._OVERRIDE_ENV)
        from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM
        from transformers import AutoConfig, AutoModelForCausalLM
        print(vaultgemma_hf.AUTO_CLASSES_RESOLVE_TO)
        print(type(AutoModelForCausalLM.from_config(VaultGemmaConfig(**{tiny_config_kwargs()!r}))).__module__)
        print(type(AutoConfig.from_pretrained({str(tmp_path)!r})).__module__)
        """
    ).split()
    assert out[:3] == ["False", "False", "True"], out
    assert out[3] == "transformers"
    assert out[4].startswith("vaultgemma_hf.models.vaultgemma"), out
    assert out[5].startswith("transformers.models.vaultgemma"), out


def test_builtin_absent_registers_ours(tmp_path):
    save_tiny(tmp_path)
    out = run_python(
        f"""
        from transformers.models.auto import configuration_auto
        del configuration_auto.CONFIG_MAPPING_NAMES["vaultgemma"]  # simulate a transformers without VaultGemma
        import vaultgemma_hf
        from transformers import AutoConfig, AutoModelForCausalLM
        print(vaultgemma_hf.AUTO_CLASSES_RESOLVE_TO)
        print(type(AutoConfig.from_pretrained({str(tmp_path)!r})).__module__)
        print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__module__)
        """
    ).split()
    assert out[0] == "vaultgemma_hf"
    assert all(module.startswith("vaultgemma_hf.models.vaultgemma") for module in out[1:]), out


def test_trust_remote_code_without_the_package(tmp_path):
    model = save_tiny(tmp_path)
    assert (tmp_path / "modeling_vaultgemma.py").is_file() and (tmp_path / "configuration_vaultgemma.py").is_file()
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")  # test data only, our own file
    out = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            diff = (model(data["ids"]).logits - data["logits"]).abs().max().item()
        print(type(model).__module__, diff)
        """,
        with_package=False,
    ).split()
    assert out[0].startswith("transformers_modules"), out
    assert float(out[1]) <= 1e-5


def test_seq2seq_auto_class_points_to_causal_lm(tmp_path):
    save_tiny(tmp_path)
    # The checkpoint's config resolves to transformers' built-in class (default policy). transformers < 5.19 ignores
    # registrations for its own config classes, so there the user gets transformers' generic error instead.
    builtin_pointer = Version(transformers.__version__) >= Version("5.19")
    pointer = "decoder-only causal language model.*AutoModelForCausalLM"
    with pytest.raises(ValueError, match=pointer if builtin_pointer else "Unrecognized configuration class"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pipeline\\('text-generation'"):
        AutoModelForSeq2SeqLM.from_config(VaultGemmaConfig(**tiny_config_kwargs()))


def test_text_generation_pipeline_matches_generate(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = VaultGemmaForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = "Patient Alex reported"
    ids = tokenizer(prompt, return_tensors="pt")
    expected = tokenizer.decode(
        model.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids.input_ids.shape[1] :],
        skip_special_tokens=True,
    )
    by_path = pipeline("text-generation", model=str(tiny_model_dir))
    # by path the Auto policy decides the class: the built-in one where transformers ships it (same numbers)
    expected_module = "vaultgemma_hf." if vaultgemma_hf.AUTO_CLASSES_RESOLVE_TO == "vaultgemma_hf" else "transformers."
    assert type(by_path.model).__module__.startswith(expected_module)
    for generator in (pipeline("text-generation", model=model, tokenizer=tokenizer), by_path):
        result = generator(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)
        assert result[0]["generated_text"] == expected


def test_fixture_is_a_fresh_build(tmp_path):
    """The committed tiny checkpoint is what utils/make_fixtures.py produces from the current code."""
    import importlib.util
    import json
    import shutil

    root = Path(__file__).resolve().parents[1]
    script = root / "utils" / "make_fixtures.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    # The check covers every file of the fixture, not only weights and corpus: drift in any of them is reported.
    spec = importlib.util.spec_from_file_location("make_fixtures", script)
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    committed = make_fixtures.FIXTURES
    model_name, corpus_name = make_fixtures.MODEL_DIR.name, make_fixtures.CORPUS.name

    def edit_json(name, change):
        def edit(model_dir):
            data = json.loads((model_dir / name).read_text())
            change(data)
            (model_dir / name).write_text(json.dumps(data))

        return edit

    def set_vocab_entry(data):
        data["model"]["vocab"]["<unk>"] = 4

    def change_one_weight(model_dir):
        from safetensors.torch import load_file, save_file

        weights = load_file(model_dir / "model.safetensors")
        weights["model.norm.weight"][0] += 1e-3
        save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})

    perturbations = {
        "tokenizer.json": edit_json("tokenizer.json", set_vocab_entry),
        "tokenizer_config.json": edit_json("tokenizer_config.json", lambda d: d.update(padding_side="right")),
        "config.json": edit_json("config.json", lambda d: d.update(rms_norm_eps=1e-5)),
        "generation_config.json": edit_json("generation_config.json", lambda d: d.pop("pad_token_id")),
        "model.safetensors": change_one_weight,
        "not in a fresh build": lambda model_dir: (model_dir / "chat_template.jinja").write_text("{{ messages }}"),
        "missing": lambda model_dir: (model_dir / "generation_config.json").unlink(),
        corpus_name: lambda model_dir: (model_dir.parent / corpus_name).write_text("another corpus\n"),
        # only which transformers release wrote the file: ignored, as are key order and indentation
        None: edit_json("config.json", lambda d: d.update(transformers_version="0.0.1")),
    }
    for expected, perturb in perturbations.items():
        copy = tmp_path / str(expected)
        shutil.copytree(committed / model_name, copy / model_name)
        shutil.copy(committed / corpus_name, copy / corpus_name)
        perturb(copy / model_name)
        found = make_fixtures.differences(committed, copy)
        if expected is None:
            assert found == [], found
        else:
            assert len(found) == 1 and expected in found[0], (expected, found)


def test_top_level_exports_resolve():
    for name in vaultgemma_hf.__all__:
        assert getattr(vaultgemma_hf, name) is not None, name
    from vaultgemma_hf import DPTrainer, DPTrainingArguments

    assert issubclass(DPTrainer, transformers.Trainer)
    assert issubclass(DPTrainingArguments, transformers.TrainingArguments)

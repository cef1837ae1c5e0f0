"""`vaultgemma-hf convert` end to end: dtypes, sharding, tokenizer files, HF re-save, LoRA merging, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_conversion import hf_model_logits, load_eager, random_jax_params
from vaultgemma_hf.cli.main import main


def read_safetensors_dir(path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in os.listdir(path) if p.startswith("model") and p.endswith(".safetensors"))
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def run(*argv) -> int:
    return main(["convert", *map(str, argv), "--quiet"])


def test_jax_to_hf_bf16_with_verify(tmp_path, capsys):
    params = random_jax_params()
    np.savez(tmp_path / "src.npz", **params)
    assert run(tmp_path / "src.npz", tmp_path / "hf", "--dtype", "bf16", "--verify", "--config", "tiny") == 0
    out = capsys.readouterr().out
    assert "max abs logit diff" in out and "OK" in out
    state = read_safetensors_dir(tmp_path / "hf")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    expected = torch.from_numpy(params["transformer/embedder/input_embedding"]).to(torch.bfloat16)
    assert torch.equal(state["model.embed_tokens.weight"], expected)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "vaultgemma"
    assert config["layer_types"] == ["full_attention"] * 2 and config["tie_word_embeddings"] is True
    assert config["final_logit_softcapping"] is None and config["attn_logit_softcapping"] is None
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 1, 0)


def test_sharded_output_has_an_index_and_loads_in_both_classes(tmp_path):
    transformers = pytest.importorskip("transformers")
    np.savez(tmp_path / "src.npz", **random_jax_params(attention="split", kv_heads=2))
    assert run(tmp_path / "src.npz", tmp_path / "single") == 0
    assert run(tmp_path / "src.npz", tmp_path / "sharded", "--shard-size", "20KB") == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    for name in shards:
        with safe_open(str(tmp_path / "sharded" / name), framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    single, sharded = read_safetensors_dir(tmp_path / "single"), read_safetensors_dir(tmp_path / "sharded")
    assert set(index["weight_map"]) == set(single) == set(sharded)
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    prompts = np.array([[4, 8, 15, 16, 23, 42]])
    reference = hf_model_logits(load_eager(tmp_path / "single"), prompts)
    np.testing.assert_array_equal(hf_model_logits(load_eager(tmp_path / "sharded"), prompts), reference)
    builtin = load_eager(tmp_path / "sharded", transformers.VaultGemmaForCausalLM)
    np.testing.assert_array_equal(hf_model_logits(builtin, prompts), reference)


def test_tokenizer_files_are_copied(tmp_path, tiny_model_dir):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    assert run(tmp_path / "src.npz", tmp_path / "hf", "--tokenizer", tiny_model_dir) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    (tmp_path / "spm.model").write_bytes(b"\x0a\x03abc")  # a SentencePiece model file is copied as is
    assert run(tmp_path / "src.npz", tmp_path / "hf2", "--tokenizer", tmp_path / "spm.model") == 0
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == b"\x0a\x03abc"


def test_hf_resave_changes_dtype_and_keeps_side_files(tmp_path, tiny_model_dir, capsys):
    assert run(tiny_model_dir, tmp_path / "bf16", "--to", "hf", "--dtype", "bf16", "--verify") == 0
    assert "OK" in capsys.readouterr().out
    source, resaved = read_safetensors_dir(tiny_model_dir), read_safetensors_dir(tmp_path / "bf16")
    assert set(resaved) == set(source) - {"lm_head.weight"}
    assert all(torch.equal(resaved[k], source[k].to(torch.bfloat16)) for k in resaved)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "bf16" / name).exists(), name
    assert json.loads((tmp_path / "bf16" / "generation_config.json").read_text())["eos_token_id"] == 1


def test_hf_to_jax_and_back_is_bit_identical(tmp_path, tiny_model_dir, capsys):
    assert run(tiny_model_dir, tmp_path / "params.npz", "--verify", "--gating-layout", "DF") == 0
    assert "OK" in capsys.readouterr().out
    with np.load(tmp_path / "params.npz") as data:
        assert data["transformer/layer_0/mlp/gating_einsum"].shape == (2, 64, 128)  # [2, D, F]
    assert run(tmp_path / "params.npz", tmp_path / "hf") == 0
    source, back = read_safetensors_dir(tiny_model_dir), read_safetensors_dir(tmp_path / "hf")
    assert set(back) == set(source) - {"lm_head.weight"}
    for key in back:
        assert back[key].dtype == source[key].dtype and torch.equal(back[key], source[key]), key


def _make_adapter(base_dir, adapter_dir):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = load_eager(base_dir)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapter really changes the model
    )
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(str(adapter_dir))
    return model


def test_merge_lora_matches_the_peft_model(tmp_path, tiny_model_dir, capsys):
    peft_model = _make_adapter(tiny_model_dir, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    code = run("--merge-lora", tmp_path / "adapter", tiny_model_dir, tmp_path / "merged", "--verify")
    assert code == 0
    out = capsys.readouterr().out
    assert "merged weights vs PEFT model" in out and out.count(" OK") == 2

    prompts = np.random.default_rng(0).integers(0, 512, size=(2, 9))
    expected = hf_model_logits(peft_model, prompts)
    merged = load_eager(tmp_path / "merged")
    actual = hf_model_logits(merged, prompts)
    base = hf_model_logits(load_eager(tiny_model_dir), prompts)
    diff = float(np.abs(actual - expected).max())
    print(f"merged vs PEFT max abs logit diff {diff:.3e}; adapter effect {np.abs(base - expected).max():.3e}")
    assert np.abs(base - expected).max() > 1e-2  # the adapter matters
    assert diff < 1e-5
    state = read_safetensors_dir(tmp_path / "merged")
    assert not any("lora" in k for k in state) and set(state) == set(read_safetensors_dir(tiny_model_dir)) - {
        "lm_head.weight"
    }


def test_merge_lora_refuses_pickle_adapters(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"never loaded")
    assert run("--merge-lora", tmp_path / "adapter", tiny_model_dir, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no adapter_model.safetensors" in err and "adapter_model.bin" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_failed_verification_exits_1_and_writes_nothing(tmp_path, capsys):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    assert run(tmp_path / "src.npz", tmp_path / "hf", "--verify", "--verify-rtol", "0") == 1
    err = capsys.readouterr().err
    assert "verification failed, nothing was written" in err and "FAILED" in err
    assert sorted(os.listdir(tmp_path)) == ["src.npz"]


def test_verify_fails_when_the_logits_carry_no_information(tmp_path, capsys):
    """Zero embedding rows for the prompt tokens (e.g. the padding rows of a vocabulary read with the wrong size) give
    all-zero logits on both sides: agreement then proves nothing, and --verify used to report OK."""
    params = random_jax_params()
    params["transformer/embedder/input_embedding"][:] = 0.0
    np.savez(tmp_path / "src.npz", **params)
    assert run(tmp_path / "src.npz", tmp_path / "hf", "--verify", "--config", "tiny") == 1
    err = capsys.readouterr().err
    assert "FAILED (uninformative" in err and "max abs logit diff 0.000e+00" in err
    assert sorted(os.listdir(tmp_path)) == ["src.npz"]


def test_verify_catches_a_broken_mapping(tmp_path, monkeypatch, capsys):
    """--verify is a real check: a converter that swapped gate and up in one layer is caught."""
    import vaultgemma_hf.conversion.pipeline as pipeline

    real = pipeline.jax_to_hf

    def swapped(*args, **kwargs):
        result = real(*args, **kwargs)
        state, p = result.state_dict, "model.layers.1.mlp."
        state[p + "gate_proj.weight"], state[p + "up_proj.weight"] = (
            state[p + "up_proj.weight"],
            state[p + "gate_proj.weight"],
        )
        return result

    monkeypatch.setattr(pipeline, "jax_to_hf", swapped)
    np.savez(tmp_path / "src.npz", **random_jax_params())
    assert run(tmp_path / "src.npz", tmp_path / "hf", "--verify") == 1
    assert "FAILED" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src.npz"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--override", "vocab_sise=3"], "unknown config key"),
        (["--to", "jax"], "already in the JAX layout"),
        (["--jax-vocab-size", "128"], "apply to JAX outputs only"),
        (["--tokenizer", "/nonexistent/tok"], "no such file or directory"),
        (["--shard-size", "lots"], "cannot read 'lots' as a size"),
        (["--config", "vaultgemma-1b"], "hidden_size=1152"),
    ],
)
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, extra, message):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    assert run(tmp_path / "src.npz", tmp_path / "hf", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaultgemma-hf convert: error:") and message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src.npz"]


def _hf_copy(tiny_model_dir, tmp_path, name="src"):
    """A writable copy of the tiny HF checkpoint, with the side files a JAX -> HF conversion records."""
    shutil.copytree(tiny_model_dir, tmp_path / name)
    (tmp_path / name / "jax_layout.json").write_text('{"attention": "fused", "gating": "FD"}')
    return tmp_path / name


def _bad_config_json(tmp_path, tiny_model_dir):
    src = _hf_copy(tiny_model_dir, tmp_path)
    (src / "config.json").write_text('{"model_type": "vaultgemma",')
    return [src, tmp_path / "out.npz"], "config.json: not valid JSON"


def _bad_index_json(tmp_path, tiny_model_dir):
    src = _hf_copy(tiny_model_dir, tmp_path)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": }')
    return [src, tmp_path / "out.npz"], "model.safetensors.index.json: not valid JSON"


def _bad_config_option(tmp_path, tiny_model_dir):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    (tmp_path / "my_config.json").write_text("{'vocab_size': 97}")
    return [tmp_path / "src.npz", tmp_path / "out", "--config", tmp_path / "my_config.json"], "--config"


def _bad_adapter_config(tmp_path, tiny_model_dir):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"')
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    return ["--merge-lora", tmp_path / "adapter", tiny_model_dir, tmp_path / "out"], "adapter_config.json: not valid"


def _padding_without_rows(tmp_path, tiny_model_dir):
    src = _hf_copy(tiny_model_dir, tmp_path)
    save_file({"rows": torch.ones(8, 64)}, str(src / "jax_embedding_padding.safetensors"))
    return [src, tmp_path / "out.npz"], "jax_embedding_padding.safetensors: no 'padding_rows' tensor"


def _layout_not_an_object(tmp_path, tiny_model_dir):
    src = _hf_copy(tiny_model_dir, tmp_path)
    (src / "jax_layout.json").write_text('["split", "DF"]')
    return [src, tmp_path / "out.npz"], "jax_layout.json: expected a JSON object, got list"


def _layout_bad_value(tmp_path, tiny_model_dir):
    src = _hf_copy(tiny_model_dir, tmp_path)
    (src / "jax_layout.json").write_text('{"attention": "fused", "embedding_rows": "many"}')
    return [src, tmp_path / "out.npz"], "jax_layout.json: embedding_rows must be a positive integer"


def _rope_theta_not_a_number(tmp_path, tiny_model_dir):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    return [tmp_path / "src.npz", tmp_path / "out", "--override", 'rope_theta="abc"'], "rope_theta='abc'"


def _rope_theta_not_a_number_hf(tmp_path, tiny_model_dir):
    return [tiny_model_dir, tmp_path / "out", "--to", "hf", "--override", "rope_theta=abc"], "rope_theta='abc'"


def _verify_longer_than_the_model(tmp_path, tiny_model_dir):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    return [tmp_path / "src.npz", tmp_path / "out", "--verify", "--verify-length", "1100"], "--verify-length 1100"


def _verify_longer_than_the_model_hf(tmp_path, tiny_model_dir):
    argv = [tiny_model_dir, tmp_path / "out.npz", "--verify", "--verify-length", "1025"]
    return argv, "--verify-length 1025 is longer than the model's max_position_embeddings = 1024"


def _zero_jax_vocab_size(tmp_path, tiny_model_dir):
    return [tiny_model_dir, tmp_path / "out.npz", "--jax-vocab-size", "0"], "--jax-vocab-size must be a positive"


@pytest.mark.parametrize(
    "case",
    [
        _bad_config_json,
        _bad_index_json,
        _bad_config_option,
        _bad_adapter_config,
        _padding_without_rows,
        _layout_not_an_object,
        _layout_bad_value,
        _rope_theta_not_a_number,
        _rope_theta_not_a_number_hf,
        _verify_longer_than_the_model,
        _verify_longer_than_the_model_hf,
        _zero_jax_vocab_size,
    ],
)
def test_bad_files_and_values_exit_2_with_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch, case):
    import vaultgemma_hf.conversion.pipeline as pipeline

    argv, message = case(tmp_path, tiny_model_dir)
    if case in (_verify_longer_than_the_model, _verify_longer_than_the_model_hf):
        # Refused as soon as the config is known: before the mapping (JAX) or the weights are read (HF).
        def too_late(*args, **kwargs):
            raise AssertionError("the conversion ran before the option was checked")

        monkeypatch.setattr(pipeline, "jax_to_hf", too_late)
        monkeypatch.setattr(pipeline, "read_hf", too_late)
    before = sorted(os.listdir(tmp_path))
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaultgemma-hf convert: error:") and message in err, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary directory left


def test_a_recorded_layout_with_bad_values_names_the_file(tmp_path, tiny_model_dir):
    from vaultgemma_hf.conversion import ConversionError, convert

    src = _hf_copy(tiny_model_dir, tmp_path)
    (src / "jax_layout.json").write_text('{"attention": "mixed"}')
    with pytest.raises(ConversionError, match=r"jax_layout.json: attention layout must be one of"):
        convert(src, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def _make_embedding_adapter(base_dir, adapter_dir, target_modules, **kwargs):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = load_eager(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about adapters on tied layers: that is the point here
        model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(str(adapter_dir))
    return model


@pytest.mark.parametrize(
    "targets, message",
    [
        (["q_proj", "embed_tokens"], "LoRA layer on model.embed_tokens but nothing on lm_head"),
        (["v_proj", "lm_head"], "LoRA layer on lm_head but nothing on model.embed_tokens"),
    ],
)
def test_merge_lora_refuses_an_adapter_that_unties_the_output_layer(
    tmp_path, tiny_model_dir, capsys, targets, message
):
    _make_embedding_adapter(tiny_model_dir, tmp_path / "adapter", targets)
    assert run("--merge-lora", tmp_path / "adapter", tiny_model_dir, tmp_path / "merged") == 2
    err = capsys.readouterr().err
    assert message in err and "ensure_weight_tying=True" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_merge_lora_with_tied_embedding_adapters_matches_the_peft_model(tmp_path, tiny_model_dir):
    """With `ensure_weight_tying=True` PEFT ties the lm_head adapter to the embedding's: that adapter is mergeable.
    (PEFT's own merge adds the update to the shared matrix twice, once per module; the merged checkpoint holds it
    once.)"""
    peft_model = _make_embedding_adapter(
        tiny_model_dir, tmp_path / "adapter", ["q_proj", "embed_tokens"], ensure_weight_tying=True
    )
    assert run("--merge-lora", tmp_path / "adapter", tiny_model_dir, tmp_path / "merged", "--verify") == 0
    prompts = np.random.default_rng(3).integers(0, 512, size=(2, 9))
    expected = hf_model_logits(peft_model, prompts)
    base = hf_model_logits(load_eager(tiny_model_dir), prompts)
    actual = hf_model_logits(load_eager(tmp_path / "merged"), prompts)
    assert np.abs(base - expected).max() > 1.0  # the adapter (embedding included) matters
    assert np.abs(actual - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


def test_merge_is_always_checked_against_the_peft_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Even without --verify, merged weights that compute another model than the PEFT model are refused."""
    import vaultgemma_hf.conversion.lora as lora

    _make_embedding_adapter(tiny_model_dir, tmp_path / "adapter", ["q_proj", "embed_tokens"])
    monkeypatch.setattr(lora, "check_tied_layers", lambda *args: None)  # let the untying adapter through
    assert run("--merge-lora", tmp_path / "adapter", tiny_model_dir, tmp_path / "merged") == 2
    err = capsys.readouterr().err
    assert "the merged weights do not compute the PEFT model" in err and "nothing was written" in err, err
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_zero_jax_vocab_size_is_not_ignored_from_python(tmp_path, tiny_model_dir):
    from vaultgemma_hf.conversion import ConversionError, convert

    with pytest.raises(ConversionError, match="--jax-vocab-size must be a positive"):
        convert(tiny_model_dir, tmp_path / "out.npz", jax_vocab_size=0)
    with pytest.raises(ConversionError, match="--jax-vocab-size 500 is smaller than vocab_size = 512"):
        convert(tiny_model_dir, tmp_path / "out.npz", jax_vocab_size=500)
    assert os.listdir(tmp_path) == []

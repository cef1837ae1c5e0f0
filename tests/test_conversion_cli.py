"""`vaultgemma-hf convert` end to end: dtypes, sharding, tokenizer files, HF re-save, LoRA merging, exit codes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

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

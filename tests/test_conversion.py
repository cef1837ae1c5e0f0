"""Conversion JAX gemma layout <-> HF: mapping against an independent forward pass, round trips, every error path.

The oracle `oracle_logits` below is written from the layout's definition with explicit per-head / per-position loops
and an explicit RoPE rotation per pair of coordinates; it shares no code with `vaultgemma_hf.conversion` (whose own
`reference_forward`, used by `--verify`, is a separate einsum implementation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch

from vaultgemma_hf import VaultGemmaForCausalLM
from vaultgemma_hf.conversion import (
    ConversionError,
    JaxLayout,
    MissingDependencyError,
    convert,
    hf_to_jax,
    infer_config,
    jax_to_hf,
    make_config,
)
from vaultgemma_hf.conversion.layout import Dims, expected_hf_shapes, expected_jax_shapes

EMB = "transformer/embedder/input_embedding"
TINY = dict(vocab=97, d=32, f=64, layers=2, heads=4, kv_heads=4, head_dim=8)


# ----------------------------------------------------------------------------------------------------------------
# Random JAX-layout checkpoints and the independent oracle


def random_jax_params(
    *,
    rows: int = 97,
    d: int = 32,
    f: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    head_dim: int = 8,
    attention: str = "fused",
    gating: str = "FD",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random float32 parameters in the JAX layout, written from the layout table (norm scales non-zero)."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {EMB: w(rows, d, scale=1.0), "transformer/final_norm/scale": w(d, scale=0.2)}
    for i in range(layers):
        p = f"transformer/layer_{i}/"
        params[p + "pre_attention_norm/scale"] = w(d, scale=0.2)
        if attention == "fused":
            params[p + "attn/qkv_einsum/w"] = w(3, heads, d, head_dim)
        else:
            params[p + "attn/q_einsum/w"] = w(heads, d, head_dim)
            params[p + "attn/kv_einsum/w"] = w(2, kv_heads, d, head_dim)
        params[p + "attn/attn_vec_einsum/w"] = w(heads, head_dim, d)
        params[p + "pre_ffw_norm/scale"] = w(d, scale=0.2)
        params[p + "mlp/gating_einsum"] = w(2, f, d) if gating == "FD" else w(2, d, f)
        params[p + "mlp/linear"] = w(f, d)
    return params


def oracle_logits(
    params: dict[str, np.ndarray],
    tokens: list[int],
    *,
    heads: int,
    kv_heads: int,
    query_pre_attn_scalar: float,
    gating: str,
    theta: float = 10000.0,
    eps: float = 1e-6,
) -> np.ndarray:
    """float64 logits `[T, rows]` of one prompt, computed head by head and position by position."""
    P = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    table = P[EMB]
    d = table.shape[1]
    layers = len({k.split("/")[1] for k in P if k.startswith("transformer/layer_")})

    def norm(row, scale):
        return row / math.sqrt(float(np.mean(row * row)) + eps) * (1.0 + scale)

    def rotate(vec, pos):
        half = len(vec) // 2
        out = np.empty_like(vec)
        for i in range(half):
            angle = pos / theta ** (2.0 * i / len(vec))
            c, s = math.cos(angle), math.sin(angle)
            out[i] = vec[i] * c - vec[i + half] * s
            out[i + half] = vec[i + half] * c + vec[i] * s
        return out

    def gelu(v):
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    x = [table[t] * math.sqrt(d) for t in tokens]
    for layer in range(layers):
        p = f"transformer/layer_{layer}/"
        if p + "attn/qkv_einsum/w" in P:
            wq, wk, wv = P[p + "attn/qkv_einsum/w"]  # each [heads, D, H]
        else:
            wq = P[p + "attn/q_einsum/w"]
            wk, wv = P[p + "attn/kv_einsum/w"]  # each [kv_heads, D, H]
        wo = P[p + "attn/attn_vec_einsum/w"]  # [heads, H, D]
        h = [norm(row, P[p + "pre_attention_norm/scale"]) for row in x]
        attn_out = [np.zeros(d) for _ in x]
        for n in range(heads):
            g = n // (heads // kv_heads)
            keys = [rotate(h[s] @ wk[g], s) for s in range(len(x))]
            values = [h[s] @ wv[g] for s in range(len(x))]
            for t in range(len(x)):
                q = rotate(h[t] @ wq[n], t) / math.sqrt(query_pre_attn_scalar)
                scores = np.array([q @ keys[s] for s in range(t + 1)])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                context = sum(weights[s] * values[s] for s in range(t + 1))
                attn_out[t] = attn_out[t] + context @ wo[n]
        x = [x[t] + attn_out[t] for t in range(len(x))]
        gating_w = P[p + "mlp/gating_einsum"]
        w_gate, w_up = (gating_w[0].T, gating_w[1].T) if gating == "FD" else (gating_w[0], gating_w[1])  # [D, F]
        for t in range(len(x)):
            hf = norm(x[t], P[p + "pre_ffw_norm/scale"])
            x[t] = x[t] + (gelu(hf @ w_gate) * (hf @ w_up)) @ P[p + "mlp/linear"]
    out = [norm(row, P["transformer/final_norm/scale"]) for row in x]
    return np.stack([row @ table.T for row in out])


def hf_model_logits(model, prompts: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(prompts), use_cache=False).logits.double().numpy()


def load_eager(path, model_class=VaultGemmaForCausalLM):
    return model_class.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


LAYOUTS = {
    "fused-FD": dict(attention="fused", gating="FD"),
    "fused-DF": dict(attention="fused", gating="DF"),
    "split-gqa-FD": dict(attention="split", gating="FD", kv_heads=2),
    "split-DF": dict(attention="split", gating="DF"),
}


# ----------------------------------------------------------------------------------------------------------------
# Logits against the oracle


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_converted_logits_match_independent_oracle(tmp_path, name):
    spec = dict(LAYOUTS[name])
    rows = 101 if name == "fused-FD" else 97  # one case with a padded embedding table
    params = random_jax_params(rows=rows, seed=list(LAYOUTS).index(name), **spec)
    np.savez(tmp_path / "src.npz", **params)
    report = convert(tmp_path / "src.npz", tmp_path / "hf", overrides={"vocab_size": 97})
    assert report.jax_layout.attention == spec["attention"] and report.jax_layout.gating == spec["gating"]

    model = load_eager(tmp_path / "hf")
    prompts = np.random.default_rng(1).integers(0, 97, size=(2, 7))
    actual = hf_model_logits(model, prompts)
    kv_heads = spec.get("kv_heads", 4)
    expected = np.stack(
        [
            oracle_logits(params, list(p), heads=4, kv_heads=kv_heads, query_pre_attn_scalar=8, gating=spec["gating"])
            for p in prompts
        ]
    )[..., :97]
    diff = float(np.abs(actual - expected).max())
    print(f"{name}: max abs logit diff HF vs oracle = {diff:.3e} (max |logit| {np.abs(expected).max():.2f})")
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers
    assert diff < 1e-4


def test_oracle_catches_a_wrong_mapping(tmp_path):
    """The comparison above can fail: swapping two query heads in the converted model breaks it."""
    params = random_jax_params()
    np.savez(tmp_path / "src.npz", **params)
    convert(tmp_path / "src.npz", tmp_path / "hf")
    model = load_eager(tmp_path / "hf")
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w.copy_(torch.cat([w[8:16], w[0:8], w[16:]]))
    prompt = [3, 14, 15, 92, 65]
    actual = hf_model_logits(model, np.array([prompt]))[0]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="FD")
    assert np.abs(actual - expected).max() > 1e-2


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_verify_reference_forward_agrees_with_the_oracle(name):
    """`--verify` relies on the package's einsum `reference_forward`; it must agree with the loop oracle."""
    from vaultgemma_hf.conversion import reference_forward

    spec = dict(LAYOUTS[name])
    params = random_jax_params(rows=99, seed=11, **spec)
    tokens = np.array([[1, 5, 9, 2, 60, 98], [3, 3, 3, 3, 3, 3]])
    kv_heads = spec.get("kv_heads", 4)
    actual = reference_forward(
        _torch(params),
        tokens,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        query_pre_attn_scalar=8,
        gating_layout=spec["gating"],
    )
    expected = np.stack(
        [
            oracle_logits(params, list(t), heads=4, kv_heads=kv_heads, query_pre_attn_scalar=8, gating=spec["gating"])
            for t in tokens
        ]
    )
    assert actual.shape == (2, 6, 99)
    assert np.abs(actual - expected).max() < 1e-9


def test_builtin_transformers_class_loads_the_output_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    np.savez(tmp_path / "src.npz", **random_jax_params(attention="split", kv_heads=2))
    convert(tmp_path / "src.npz", tmp_path / "hf")
    prompts = np.array([[5, 6, 7, 8, 9, 10]])
    ours = hf_model_logits(load_eager(tmp_path / "hf"), prompts)
    builtin = hf_model_logits(load_eager(tmp_path / "hf", transformers.VaultGemmaForCausalLM), prompts)
    np.testing.assert_array_equal(ours, builtin)


# ----------------------------------------------------------------------------------------------------------------
# Pure mapping


def _torch(params):
    return {k: torch.from_numpy(v) for k, v in params.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mapping_covers_exactly_the_model_parameters_and_inverts_bit_for_bit(name):
    spec = dict(LAYOUTS[name])
    params = _torch(random_jax_params(**spec))
    config = make_config(infer_config({k: tuple(v.shape) for k, v in params.items()}))
    result = jax_to_hf(params, config)
    model_keys = {k for k in VaultGemmaForCausalLM(config).state_dict() if k != "lm_head.weight"}
    assert set(result.state_dict) == model_keys
    assert result.layout.attention == spec["attention"] and result.layout.gating == spec["gating"]
    back = hf_to_jax(result.state_dict, config, result.layout)
    assert set(back) == set(params)
    for key in params:
        assert bits_equal(back[key].numpy(), params[key].numpy()), key


def test_config_from_shapes_sets_vaultgemma_invariants():
    shapes = {k: v.shape for k, v in random_jax_params(attention="split", kv_heads=2).items()}
    values = infer_config(shapes)
    assert (values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"]) == (32, 64, 2)
    assert (values["num_attention_heads"], values["num_key_value_heads"], values["head_dim"]) == (4, 2, 8)
    assert values["vocab_size"] == 97 and values["query_pre_attn_scalar"] == 8
    assert values["layer_types"] == ["full_attention"] * 2
    assert values["attn_logit_softcapping"] is None and values["final_logit_softcapping"] is None
    assert values["tie_word_embeddings"] is True
    assert infer_config(shapes, overrides=["query_pre_attn_scalar=32"])["query_pre_attn_scalar"] == 32
    assert infer_config(shapes, overrides=["rope_theta=500000"])["rope_parameters"]["rope_theta"] == 500000.0


def test_vaultgemma_1b_preset_matches_the_released_shapes_from_shapes_alone():
    preset_dims = Dims(256000, 1152, 6912, 26, 4, 4, 256)
    shapes = expected_jax_shapes(preset_dims, JaxLayout(attention="fused", gating="FD", embedding_rows=256128))
    values = infer_config(shapes, base="vaultgemma-1b")
    assert values["vocab_size"] == 256000 and values["query_pre_attn_scalar"] == 256
    assert values["max_position_embeddings"] == 1024
    # The padded Gemma table is recognised without a preset too.
    assert infer_config(shapes)["vocab_size"] == 256000
    # Parameter count of the released model (vaultgemma-facts.md): 1,038,741,120.
    hf_shapes = expected_hf_shapes(Dims.from_config(make_config(values)))
    assert sum(math.prod(s) for s in hf_shapes.values()) == 1_038_741_120


def test_preset_that_contradicts_the_shapes_names_key_and_tensor():
    shapes = {k: v.shape for k, v in random_jax_params().items()}
    with pytest.raises(ConversionError, match=r"hidden_size=1152.*hidden_size=32.*input_embedding"):
        infer_config(shapes, base="vaultgemma-1b")
    assert infer_config(shapes, base="tiny")["vocab_size"] == 97


@pytest.mark.parametrize(
    "override, message",
    [
        ("final_logit_softcapping=30.0", "final_logit_softcapping"),
        ('layer_types=["sliding_attention","full_attention"]', "full attention"),
        ("tie_word_embeddings=false", "tie_word_embeddings"),
        ("vocab_sise=3", "unknown config key"),
        ("no-equals-sign", "KEY=VALUE"),
        ("vocab_size=200", "larger than the 97 rows"),
    ],
)
def test_bad_overrides_are_refused(override, message):
    shapes = {k: v.shape for k, v in random_jax_params().items()}
    with pytest.raises(ConversionError, match=message):
        infer_config(shapes, overrides=[override])


# ----------------------------------------------------------------------------------------------------------------
# Error paths: every key accounted for, nothing written on failure


def _convert_modified(tmp_path, modify, **kwargs):
    params = random_jax_params()
    modify(params)
    np.savez(tmp_path / "src.npz", **params)
    return convert(tmp_path / "src.npz", tmp_path / "out", **kwargs)


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["src.npz"]  # no temporary directory left behind either


@pytest.mark.parametrize(
    "modify, message",
    [
        (
            lambda p: p.pop("transformer/layer_1/pre_ffw_norm/scale"),
            r"missing key\(s\): transformer/layer_1/pre_ffw_norm",
        ),
        (
            lambda p: p.__setitem__("transformer/layer_0/attn/_key_norm/scale", np.zeros(8, np.float32)),
            r"unknown key\(s\): transformer/layer_0/attn/_key_norm/scale",
        ),
        (
            lambda p: p.__setitem__("transformer/layer_1/attn/attn_vec_einsum/w", np.zeros((4, 8, 31), np.float32)),
            r"transformer/layer_1/attn/attn_vec_einsum/w: shape \(4, 8, 31\) does not match the expected \(4, 8, 32\)",
        ),
        (
            lambda p: p.__setitem__("transformer/layer_0/mlp/linear", np.zeros((64, 33), np.float32)),
            r"transformer/layer_0/mlp/linear: shape \(64, 33\)",
        ),
        (
            lambda p: p.__setitem__("transformer/layer_0/mlp/gating_einsum", np.zeros((2, 64, 30), np.float32)),
            r"transformer/layer_0/mlp/gating_einsum: shape \(2, 64, 30\) is neither",
        ),
        (
            lambda p: p.__setitem__("transformer/layer_2/pre_ffw_norm/scale", np.zeros(32, np.float32)),
            "transformer/layer_2",
        ),
        (
            lambda p: p.__setitem__("transformer/layer_0/post_attention_norm/scale", np.zeros(32, np.float32)),
            r"post-attention/post-feedforward norms.*layer_0/post_attention_norm/scale.*--drop-post-norms",
        ),
        (lambda p: p.pop(EMB), "missing key transformer/embedder/input_embedding"),
    ],
)
def test_bad_keys_are_named_and_nothing_is_written(tmp_path, modify, message):
    with pytest.raises(ConversionError, match=message):
        _convert_modified(tmp_path, modify)
    _assert_nothing_written(tmp_path)


def test_mixed_attention_layouts_are_refused(tmp_path):
    def modify(p):
        qkv = p.pop("transformer/layer_1/attn/qkv_einsum/w")
        p["transformer/layer_1/attn/q_einsum/w"] = qkv[0]
        p["transformer/layer_1/attn/kv_einsum/w"] = qkv[1:]

    with pytest.raises(ConversionError, match="mixed attention layouts"):
        _convert_modified(tmp_path, modify)
    _assert_nothing_written(tmp_path)


def test_post_norms_can_be_dropped_explicitly(tmp_path):
    params = random_jax_params()
    reference_hf = jax_to_hf(_torch(params), make_config(infer_config({k: v.shape for k, v in params.items()})))

    def modify(p):
        for i in range(2):
            p[f"transformer/layer_{i}/post_attention_norm/scale"] = np.ones(32, np.float32)
            p[f"transformer/layer_{i}/post_ffw_norm/scale"] = np.ones(32, np.float32)

    report = _convert_modified(tmp_path, modify, drop_post_norms=True)
    assert len(report.jax_layout.dropped_keys) == 4
    assert any("post-norm" in note for note in report.notes)
    recorded = json.loads((tmp_path / "out" / "jax_layout.json").read_text())
    assert "transformer/layer_1/post_ffw_norm/scale" in recorded["dropped_keys"]
    model = load_eager(tmp_path / "out")
    for key, value in reference_hf.state_dict.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_square_mlp_gating_is_ambiguous_without_a_flag(tmp_path):
    params = random_jax_params(f=32, gating="DF")
    np.savez(tmp_path / "src.npz", **params)
    with pytest.raises(ConversionError, match=r"ambiguous.*--gating-layout FD\|DF"):
        convert(tmp_path / "src.npz", tmp_path / "out")
    _assert_nothing_written(tmp_path)
    report = convert(tmp_path / "src.npz", tmp_path / "out", gating_layout="DF")
    assert report.jax_layout.gating == "DF"
    prompt = [1, 2, 3, 4]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="DF")
    actual = hf_model_logits(load_eager(tmp_path / "out"), np.array([prompt]))[0]
    assert np.abs(actual - expected).max() < 1e-4


def test_gating_flag_contradicting_the_shapes_is_refused(tmp_path):
    np.savez(tmp_path / "src.npz", **random_jax_params(gating="FD"))
    with pytest.raises(ConversionError, match="is the FD layout, but DF was asked for"):
        convert(tmp_path / "src.npz", tmp_path / "out", gating_layout="DF")


def test_existing_destination_needs_overwrite(tmp_path):
    np.savez(tmp_path / "src.npz", **random_jax_params())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        convert(tmp_path / "src.npz", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    convert(tmp_path / "src.npz", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "src.npz"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import vaultgemma_hf.conversion.io_hf as io_hf

    real_save = io_hf.save_config_like_model

    def broken(path, config):
        real_save(path, config)
        raise OSError("disk full")

    monkeypatch.setattr(io_hf, "save_config_like_model", broken)
    np.savez(tmp_path / "src.npz", **random_jax_params())
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "src.npz", tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_untied_output_layer_is_refused():
    params = _torch(random_jax_params())
    config = make_config(infer_config({k: tuple(v.shape) for k, v in params.items()}))
    state = jax_to_hf(params, config).state_dict
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        hf_to_jax(state, config)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # tied (equal): fine
    assert "transformer/final_norm/scale" in hf_to_jax(state, config)


def test_pickle_only_directories_are_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "vaultgemma"}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin\)"):
        convert(tmp_path / "m", tmp_path / "out.npz")


def test_unknown_source_format_is_explained(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ConversionError, match="cannot tell the format"):
        convert(tmp_path / "x", tmp_path / "out")
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "missing", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# Round trips through .npz (Orbax: test_conversion_orbax.py)


@pytest.mark.parametrize("name", [*LAYOUTS, "fused-FD-bf16"])
def test_npz_round_trip_is_bit_identical(tmp_path, name):
    spec = dict(LAYOUTS[name.removesuffix("-bf16")])
    params = random_jax_params(seed=7, **spec)
    if name.endswith("bf16"):
        ml_dtypes = pytest.importorskip("ml_dtypes")
        params = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    np.savez(tmp_path / "src.npz", **params)
    convert(tmp_path / "src.npz", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "back.npz")  # layout recorded in hf/jax_layout.json
    back = load_npz(tmp_path / "back.npz")
    original = load_npz(tmp_path / "src.npz")
    assert set(back) == set(original)
    for key in original:
        assert bits_equal(back[key], original[key]), key


def test_padded_embedding_rows_come_back_exactly(tmp_path, caplog):
    params = random_jax_params(rows=104)
    np.savez(tmp_path / "src.npz", **params)
    with caplog.at_level(logging.WARNING):
        convert(tmp_path / "src.npz", tmp_path / "hf", overrides=["vocab_size=97"])
    assert "104 rows; kept the first 97" in caplog.text
    model = load_eager(tmp_path / "hf")
    assert model.model.embed_tokens.weight.shape == (97, 32)
    assert (tmp_path / "hf" / "jax_embedding_padding.safetensors").exists()
    convert(tmp_path / "hf", tmp_path / "back.npz")
    assert bits_equal(load_npz(tmp_path / "back.npz")[EMB], params[EMB])


def test_padding_to_a_requested_size_uses_zero_rows(tmp_path):
    params = random_jax_params()
    np.savez(tmp_path / "src.npz", **params)
    convert(tmp_path / "src.npz", tmp_path / "hf")
    report = convert(tmp_path / "hf", tmp_path / "back.npz", jax_vocab_size=128)
    assert any("zero rows" in note for note in report.notes)
    table = load_npz(tmp_path / "back.npz")[EMB]
    assert table.shape == (128, 32)
    assert bits_equal(table[:97], params[EMB]) and not table[97:].any()


def test_split_attention_can_be_fused_on_the_way_back_when_heads_match(tmp_path):
    params = random_jax_params(attention="split")
    np.savez(tmp_path / "src.npz", **params)
    convert(tmp_path / "src.npz", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "fused.npz", attention_layout="fused", gating_layout="DF")
    fused = load_npz(tmp_path / "fused.npz")
    w = fused["transformer/layer_1/attn/qkv_einsum/w"]
    assert bits_equal(w[0], params["transformer/layer_1/attn/q_einsum/w"])
    assert bits_equal(w[1:], params["transformer/layer_1/attn/kv_einsum/w"])
    gating = fused["transformer/layer_0/mlp/gating_einsum"]
    assert bits_equal(gating, params["transformer/layer_0/mlp/gating_einsum"].transpose(0, 2, 1).copy())


def test_fused_attention_needs_equal_head_counts(tmp_path):
    np.savez(tmp_path / "src.npz", **random_jax_params(attention="split", kv_heads=2))
    convert(tmp_path / "src.npz", tmp_path / "hf")
    with pytest.raises(ConversionError, match="num_key_value_heads == num_attention_heads"):
        convert(tmp_path / "hf", tmp_path / "back.npz", attention_layout="fused")
    assert not (tmp_path / "back.npz").exists()


def test_npz_and_safetensors_work_without_orbax(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "orbax" or m.startswith("orbax.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "orbax", None)  # `import orbax...` now raises ImportError
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    np.savez(tmp_path / "src.npz", **random_jax_params())
    convert(tmp_path / "src.npz", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "back.npz")
    with pytest.raises(MissingDependencyError, match=r"vaultgemma-hf\[convert\]"):
        convert(tmp_path / "hf", tmp_path / "back_orbax")
    assert not (tmp_path / "back_orbax").exists()


# ----------------------------------------------------------------------------------------------------------------
# Trees of the gemma library and of its Kauldron trainer (Orbax versions: test_conversion_orbax.py)


def gemma_library_tree(params: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """The flat keys of `params` as `gm.ckpts.save_params` ("nested": the Flax `model.init()['params']`, without
    the `transformer` level) or a Kauldron `TrainState` ("kauldron": `params`, `opt_state`, `step`, `collections`)
    store them."""
    bare = {key.removeprefix("transformer/"): value for key, value in params.items()}
    if kind == "nested":
        return bare
    tree = {f"params/{key}": value for key, value in bare.items()}
    tree.update({f"opt_state/0/mu/{key}": np.full_like(value, 7.0) for key, value in bare.items()})
    tree["step"] = np.array(1000, np.int64)
    tree["collections/ema/embedder/input_embedding"] = np.zeros_like(params[EMB])
    return tree


@pytest.mark.parametrize("kind", ["nested", "kauldron"])
def test_gemma_library_and_trainer_trees_convert_and_match_the_oracle(tmp_path, caplog, kind):
    params = random_jax_params(seed=21)
    tree = gemma_library_tree(params, kind)
    assert "embedder/input_embedding" in tree or "params/embedder/input_embedding" in tree
    np.savez(tmp_path / "src.npz", **tree)
    with caplog.at_level(logging.WARNING):
        convert(tmp_path / "src.npz", tmp_path / "hf")
    if kind == "kauldron":
        assert "ignored collections, opt_state, step" in caplog.text
    prompt = [4, 40, 0, 96, 13, 13, 2]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="FD")
    actual = hf_model_logits(load_eager(tmp_path / "hf"), np.array([prompt]))[0]
    assert np.abs(expected).max() > 1.0
    assert np.abs(actual - expected).max() < 1e-4
    # The way back writes the canonical layout, bit for bit.
    convert(tmp_path / "hf", tmp_path / "back.npz")
    back = load_npz(tmp_path / "back.npz")
    assert set(back) == set(params) and all(bits_equal(back[k], params[k]) for k in params)


def test_unknown_root_beside_params_is_not_dropped(tmp_path):
    """Only a trainer's training state is ignored: another root beside `params` is reported, not dropped."""
    tree = gemma_library_tree(random_jax_params(), "kauldron")
    tree["ema_params/embedder/input_embedding"] = tree["params/embedder/input_embedding"]
    np.savez(tmp_path / "src.npz", **tree)
    with pytest.raises(ConversionError, match=r"unknown key\(s\): .*ema_params/embedder/input_embedding"):
        convert(tmp_path / "src.npz", tmp_path / "out")
    _assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Atomic output: a destination that appears during the conversion is left alone


def test_destination_created_during_the_conversion_is_not_replaced(tmp_path, monkeypatch):
    import vaultgemma_hf.conversion.io_hf as io_hf

    real_save = io_hf.save_config_like_model

    def someone_else_writes_out(path, config):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("not ours")
        return real_save(path, config)

    monkeypatch.setattr(io_hf, "save_config_like_model", someone_else_writes_out)
    np.savez(tmp_path / "src.npz", **random_jax_params())
    with pytest.raises(ConversionError, match="out appeared while converting"):
        convert(tmp_path / "src.npz", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["theirs.txt"]
    assert (tmp_path / "out" / "theirs.txt").read_text() == "not ours"
    assert sorted(os.listdir(tmp_path)) == ["out", "src.npz"]  # the temporary output is gone


def test_file_destination_created_during_the_conversion_is_not_replaced(tmp_path, monkeypatch):
    import vaultgemma_hf.conversion.pipeline as pipeline

    np.savez(tmp_path / "src.npz", **random_jax_params())
    convert(tmp_path / "src.npz", tmp_path / "hf")
    real_write = pipeline.write_jax

    def someone_else_writes_back(params, path, fmt):
        (tmp_path / "back.npz").write_bytes(b"not ours")
        real_write(params, path, fmt)

    monkeypatch.setattr(pipeline, "write_jax", someone_else_writes_back)
    with pytest.raises(ConversionError, match="back.npz appeared while converting"):
        convert(tmp_path / "hf", tmp_path / "back.npz")
    assert (tmp_path / "back.npz").read_bytes() == b"not ours"
    assert sorted(os.listdir(tmp_path)) == ["back.npz", "hf", "src.npz"]
    # With --overwrite the same race replaces it, as asked.
    convert(tmp_path / "hf", tmp_path / "back.npz", overwrite=True)
    assert bits_equal(load_npz(tmp_path / "back.npz")[EMB], random_jax_params()[EMB])

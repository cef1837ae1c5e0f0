"""Conversion through real Orbax checkpoints: bit-identical round trips JAX -> HF -> JAX for every layout.

The source checkpoints are written, and the results restored, with Orbax directly in the test (not with the
package's reader/writer).
"""

from __future__ import annotations

import numpy as np
import pytest

from test_conversion import LAYOUTS, bits_equal, hf_model_logits, load_eager, oracle_logits, random_jax_params
from vaultgemma_hf.cli.main import main

ocp = pytest.importorskip("orbax.checkpoint")


def nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def orbax_save(path, tree) -> None:
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(path, tree)


def orbax_restore(path) -> dict[str, np.ndarray]:
    return flatten(ocp.PyTreeCheckpointer().restore(path))


@pytest.mark.parametrize("name", [*LAYOUTS, "split-gqa-FD-bf16"])
def test_orbax_round_trip_is_bit_identical(tmp_path, name, capsys):
    spec = dict(LAYOUTS[name.removesuffix("-bf16")])
    params = random_jax_params(rows=100, seed=3, **spec)
    if name.endswith("bf16"):
        import ml_dtypes

        params = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    orbax_save(tmp_path / "src", nest(params))

    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--override", "vocab_size=97"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--verify"]) == 0
    assert "OK" in capsys.readouterr().out

    back = orbax_restore(tmp_path / "back")
    assert set(back) == set(params)
    for key, value in params.items():
        assert bits_equal(back[key], value), key


def test_released_flat_checkpoint_layout_is_read(tmp_path):
    """The released gemma checkpoints store flat keys with '/' and `{'w': ...}` leaves, also under mlp/."""
    params = random_jax_params(seed=5)
    legacy: dict = {}
    for key, value in params.items():
        module, leaf = key.rsplit("/", 1)
        if key.endswith(("mlp/gating_einsum", "mlp/linear")):
            module, leaf = key, "w"
        legacy.setdefault(module, {})[leaf] = value
    assert "transformer/layer_0/mlp/gating_einsum" in legacy and "transformer/embedder" in legacy
    orbax_save(tmp_path / "src", legacy)

    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--verify", "--config", "tiny"]) == 0
    prompt = [7, 1, 88, 42, 5, 9]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="FD")
    actual = hf_model_logits(load_eager(tmp_path / "hf"), np.array([prompt]))[0]
    assert np.abs(actual - expected).max() < 1e-4


def test_hf_to_orbax_with_padding_and_verify(tmp_path, tiny_model_dir, capsys):
    code = main(["convert", str(tiny_model_dir), str(tmp_path / "jax"), "--jax-vocab-size", "520", "--verify"])
    assert code == 0
    out = capsys.readouterr().out
    assert "max abs logit diff" in out and "OK" in out
    restored = orbax_restore(tmp_path / "jax")
    table = restored["transformer/embedder/input_embedding"]
    assert table.shape == (520, 64) and not table[512:].any()
    assert restored["transformer/layer_1/attn/qkv_einsum/w"].shape == (3, 2, 64, 32)

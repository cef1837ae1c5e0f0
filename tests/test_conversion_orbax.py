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

    # Written as the released gemma checkpoints are: `mlp/gating_einsum` and `mlp/linear` hold a `w` leaf.
    back = orbax_restore(tmp_path / "back")
    released = {k + "/w" if k.endswith(("mlp/gating_einsum", "mlp/linear")) else k: v for k, v in params.items()}
    assert set(back) == set(released)
    for key, value in released.items():
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


def _trainer_state(params: dict[str, np.ndarray]) -> dict:
    """A Kauldron `TrainState`-like tree: the Flax params plus optimizer state (tuples, as optax's), step and
    collections."""
    bare = nest(params)["transformer"]
    opt_state = ({"mu": nest({k: np.ones_like(v) for k, v in params.items()})["transformer"]}, {"count": np.int32(3)})
    return {"params": bare, "opt_state": opt_state, "step": np.int64(1000), "collections": {}}


@pytest.mark.parametrize("kind", ["gm.ckpts.save_params", "kauldron"])
def test_gemma_library_checkpoints_are_read(tmp_path, caplog, kind):
    """`gm.ckpts.save_params` saves `model.init()['params']` (no `transformer` level) with a StandardCheckpointer;
    a Kauldron trainer checkpoint holds `{'params', 'opt_state', 'step', 'collections'}`."""
    import logging

    params = random_jax_params(seed=8, attention="split", kv_heads=2)
    tree = nest(params)["transformer"] if kind != "kauldron" else _trainer_state(params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "src", tree)
    checkpointer.wait_until_finished()

    with caplog.at_level(logging.WARNING):
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--verify", "--quiet"]) == 0
    if kind == "kauldron":
        assert "ignored collections, opt_state, step" in caplog.text
    prompt = [9, 8, 7, 60, 61, 1]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=2, query_pre_attn_scalar=8, gating="FD")
    actual = hf_model_logits(load_eager(tmp_path / "hf"), np.array([prompt]))[0]
    assert np.abs(expected).max() > 1.0
    assert np.abs(actual - expected).max() < 1e-4


def test_trainer_checkpoint_without_partial_restore(tmp_path, monkeypatch):
    """With an Orbax that has no partial restore, the whole state is restored and only `params` is kept."""
    real, refused = ocp.args.PyTreeRestore, []

    def without_partial_restore(*args, partial_restore=None, **kwargs):
        if partial_restore is not None:
            refused.append(partial_restore)
            raise TypeError("unexpected keyword argument 'partial_restore'")
        return real(*args, **kwargs)

    params = random_jax_params(seed=9)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "src", _trainer_state(params))
    checkpointer.wait_until_finished()
    monkeypatch.setattr(ocp.args, "PyTreeRestore", without_partial_restore)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--quiet"]) == 0
    assert refused == [True]  # the fallback ran
    prompt = [3, 1, 4, 1, 5]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="FD")
    actual = hf_model_logits(load_eager(tmp_path / "hf"), np.array([prompt]))[0]
    assert np.abs(actual - expected).max() < 1e-4

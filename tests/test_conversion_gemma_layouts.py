"""The conversion against the gemma library's own checkpoint definitions (google-deepmind/gemma).

The expected trees below are written from the library's sources, not from `vaultgemma_hf.conversion`:

* `gemma/gm/nn/_transformer.py`: `Transformer.setup` names the modules `embedder`, `layer_{i}`, `final_norm`;
* `gemma/gm/nn/_modules.py`: `Embedder` has the param `input_embedding [vocab, embed_dim]`; `Attention` has the
  `_layers.Einsum` modules `qkv_einsum (3, N, D, H)` (when num_kv_heads == num_heads) and
  `attn_vec_einsum (N, H, D)`, each with a `w` param; `FeedForward` shares its scope with two `Einsum`s whose
  params are named `gating_einsum` and `linear` (no `w` level); `Block` has `pre_attention_norm`, `pre_ffw_norm`;
* `gemma/gm/nn/_layers.py`: `RMSNorm` has the param `scale`;
* `gemma/gm/ckpts/_checkpoint.py`: `load_params` tells the tree types apart (`_is_stacked_layout`,
  `_is_flat_layout`, `_is_kauldron_layout`, else NESTED), turns FLAT into NESTED with `_compat.param_remapper` +
  `_compat.nest_params` + `['transformer']`, restores with `params=` through `_nested_to_flat` (=
  `_compat.flatten_and_remap_params` + the `transformer/` prefix), and reads `<step>/default` for a step
  directory (`_get_metadata_and_path`);
* `gemma/gm/ckpts/_compat.py`: `stack_params` / `unstack_params` (layer `n` is slice `n // P` of
  `stacked_layers/attention_type_{n % P}`).

Values are checked with the per-head oracle of `test_conversion.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_conversion import hf_model_logits, load_eager, oracle_logits, random_jax_params
from vaultgemma_hf.cli.main import main

# The tiny fixture `vaultgemma_hf.fixtures.TINY_MODEL_DIR`: V = 512, D = 64, F = 128, 2 layers, N = K = 2, H = 32.
FIXTURE = dict(vocab=512, d=64, f=128, layers=2, heads=2, head_dim=32)


def run(*argv) -> int:
    return main(["convert", *map(str, argv), "--quiet"])


def gemma_module_tree(*, vocab: int, d: int, f: int, layers: int, heads: int, head_dim: int) -> dict:
    """Shapes of `model.init()['params']` of a gemma-library Transformer with K == N and
    `transpose_gating_einsum=True` (see the module docstring for the files)."""
    tree: dict = {"embedder": {"input_embedding": (vocab, d)}, "final_norm": {"scale": (d,)}}
    for i in range(layers):
        tree[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": (d,)},
            "attn": {"qkv_einsum": {"w": (3, heads, d, head_dim)}, "attn_vec_einsum": {"w": (heads, head_dim, d)}},
            "pre_ffw_norm": {"scale": (d,)},
            "mlp": {"gating_einsum": (2, f, d), "linear": (f, d)},
        }
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def gemma_tree_type(tree: dict) -> str:
    """`_CheckpointTree.type` of gemma/gm/ckpts/_checkpoint.py."""
    if any(k.startswith("transformer/stacked_layers") for k in tree):
        return "STACKED"
    if all(k.startswith(("transformer/", "SigLiPFromPatches_0/")) for k in tree):
        return "FLAT"
    if set(tree) == {"collections", "opt_state", "params", "step"}:
        return "KAULDRON"
    return "NESTED"


def gemma_flat_to_nested(tree: dict) -> dict:
    """`_flat_to_nested` of gemma/gm/ckpts/_checkpoint.py (`param_remapper`, `nest_params`, `['transformer']`)."""
    remapped: dict = {}
    for key, value in tree.items():
        if "mlp/" in key:
            layer_name, param = key.rsplit("/", 1)
            remapped.setdefault(layer_name, {})
            if "w" in value:
                remapped[layer_name][param] = value["w"]
        else:
            remapped[key] = value
    nested: dict = {}
    for path, param in remapped.items():
        *parents, leaf = path.split("/")
        node = nested
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = param
    return nested["transformer"]


def gemma_nested_to_flat(nested: dict) -> dict:
    """`_nested_to_flat` of gemma/gm/ckpts/_checkpoint.py (`flatten_and_remap_params` + `transformer/` prefix):
    the tree `load_params(path, params=...)` asks Orbax for when the checkpoint is FLAT."""
    out: dict = {}
    for name, value in flatten(nested).items():
        if name.endswith(("/mlp/linear", "/mlp/gating_einsum")):
            name += "/w"
        left, right = name.rsplit("/", 1)
        out.setdefault(f"transformer/{left}", {})[right] = value
    return out


def canonical(nested: dict) -> dict[str, np.ndarray]:
    """The Flax params tree as the '/'-joined keys the oracle reads."""
    return {f"transformer/{k}": np.asarray(v) for k, v in flatten(nested).items()}


def test_orbax_output_loads_like_a_gemma_library_checkpoint(tmp_path, tiny_model_dir):
    """HF -> Orbax must give a tree `gm.ckpts.load_params` turns into `model.init()['params']`, with and without
    `params=`. It used to write `{'transformer': {...}}`, which load_params takes as NESTED and returns with an
    extra `transformer` level (and which a `params=` restore cannot match)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    import jax

    assert run(tiny_model_dir, tmp_path / "jax", "--to", "jax") == 0
    checkpointer = ocp.StandardCheckpointer()  # what gm.ckpts.load_params uses
    raw = checkpointer.restore(tmp_path / "jax")
    kind = gemma_tree_type(raw)
    loaded = gemma_flat_to_nested(raw) if kind == "FLAT" else raw
    expected = gemma_module_tree(**FIXTURE)
    shapes = {k: tuple(np.shape(v)) for k, v in flatten(loaded).items()}
    assert shapes == flatten(expected)

    # load_params(path, params=model.init()['params']): Orbax restores into the checkpoint's own structure.
    abstract = jax.tree_util.tree_map(
        lambda shape: jax.ShapeDtypeStruct(shape, np.float32), expected, is_leaf=lambda x: isinstance(x, tuple)
    )
    target = gemma_nested_to_flat(abstract) if kind == "FLAT" else abstract
    restored = checkpointer.restore(tmp_path / "jax", target)
    assert kind == "FLAT" and set(restored) == set(target)

    prompt = [5, 300, 17, 2, 511, 64]
    reference = oracle_logits(
        canonical(gemma_flat_to_nested(restored)), prompt, heads=2, kv_heads=2, query_pre_attn_scalar=32, gating="FD"
    )
    actual = hf_model_logits(load_eager(tiny_model_dir), np.array([prompt]))[0]
    assert np.abs(reference).max() > 0.1
    assert np.abs(actual - reference).max() < 1e-4


def test_checkpoint_manager_step_directory_is_read(tmp_path):
    """`gm.ckpts.load_params(<step dir>)` reads `<step>/default`; so does the converter (it used to refuse)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    params = random_jax_params(seed=11)
    nested: dict = {}
    for key, value in params.items():
        *parents, leaf = key.removeprefix("transformer/").split("/")
        node = nested
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    manager = ocp.CheckpointManager((tmp_path / "ckpts").absolute())
    manager.save(1000, args=ocp.args.StandardSave(nested))
    manager.wait_until_finished()
    step = tmp_path / "ckpts" / "1000"
    assert (step / "_CHECKPOINT_METADATA").is_file() and (step / "default").is_dir()

    assert run(step, tmp_path / "hf", "--config", "tiny") == 0
    prompt = [4, 90, 13, 13, 0, 77]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="FD")
    actual = hf_model_logits(load_eager(tmp_path / "hf"), np.array([prompt]))[0]
    assert np.abs(actual - expected).max() < 1e-4


def stack(params: dict[str, np.ndarray], pattern_len: int) -> dict[str, np.ndarray]:
    """`stack_params` of gemma/gm/ckpts/_compat.py on '/'-joined keys: layer n -> slice n // P of
    `stacked_layers/attention_type_{n % P}`."""
    groups: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for key, value in params.items():
        if not key.startswith("transformer/layer_"):
            out[key] = value
            continue
        layer, suffix = key.removeprefix("transformer/layer_").split("/", 1)
        n = int(layer)
        target = f"transformer/stacked_layers/attention_type_{n % pattern_len}/{suffix}"
        groups.setdefault(target, {})[n // pattern_len] = value
    for target, slices in groups.items():
        out[target] = np.stack([slices[s] for s in sorted(slices)])
    return out


@pytest.mark.parametrize("pattern_len", [1, 2])
def test_stacked_layers_checkpoint_is_read(tmp_path, pattern_len):
    """The STACKED layout (`transformer/stacked_layers/attention_type_{p}/...`) is read like gm.ckpts reads it;
    it used to be refused ("no transformer/layer_N/... keys found")."""
    params = random_jax_params(layers=4, seed=12)
    stacked = stack(params, pattern_len)
    assert not any(k.startswith("transformer/layer_") for k in stacked)
    np.savez(tmp_path / "stacked.npz", **stacked)

    assert run(tmp_path / "stacked.npz", tmp_path / "hf") == 0  # config from the shapes: 4 layers, V = 97
    prompt = [96, 3, 50, 50, 8, 1, 33]
    expected = oracle_logits(params, prompt, heads=4, kv_heads=4, query_pre_attn_scalar=8, gating="FD")
    actual = hf_model_logits(load_eager(tmp_path / "hf"), np.array([prompt]))[0]
    assert np.abs(actual - expected).max() < 1e-4

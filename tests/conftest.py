"""Shared test setup: offline, deterministic, tiny configs only."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one intra-op thread is several times faster than two on CI's 2 cores (thread overhead dominates).
torch.set_num_threads(1)


def tiny_config_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny VaultGemma config valid for both our class and transformers' built-in."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        query_pre_attn_scalar=8,
        layer_types=["full_attention"] * 2,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        sliding_window=512,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        kwargs["layer_types"] = ["full_attention"] * overrides["num_hidden_layers"]
    return kwargs


@pytest.fixture
def tiny_kwargs():
    return tiny_config_kwargs


@pytest.fixture(scope="session")
def tiny_model_dir():
    from vaultgemma_hf.fixtures import TINY_MODEL_DIR

    return TINY_MODEL_DIR

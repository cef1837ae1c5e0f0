"""The static-cache + compiled decode recipe against transformers' `generate` (greedy)."""

from __future__ import annotations

import os

import pytest
import torch

from vaultgemma_hf import VaultGemmaForCausalLM
from vaultgemma_hf.generation import CompiledGreedyDecoder


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return VaultGemmaForCausalLM.from_pretrained(tiny_model_dir).eval()


def reference(model, ids, new_tokens):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def test_decoder_matches_generate_and_reuses_its_cache(model):
    decoder = CompiledGreedyDecoder(model, max_cache_len=40, compile=False)
    for batch, prompt_len in ((2, 7), (2, 5), (3, 9)):
        ids = torch.randint(4, model.config.vocab_size, (batch, prompt_len))
        assert torch.equal(decoder.generate(ids, 12), reference(model, ids, 12))


def test_decoder_refuses_overflow(model):
    decoder = CompiledGreedyDecoder(model, max_cache_len=10, compile=False)
    with pytest.raises(ValueError, match="exceeds max_cache_len"):
        decoder.generate(torch.randint(4, 100, (1, 6)), 5)


@pytest.mark.skipif(
    not os.environ.get("VAULTGEMMA_HF_RUN_SLOW"), reason="compiles on CPU (~75 s); set VAULTGEMMA_HF_RUN_SLOW=1"
)
def test_compiled_decoder_matches_generate(model):
    decoder = CompiledGreedyDecoder(model, max_cache_len=32, compile=True, mode="default")
    ids = torch.randint(4, model.config.vocab_size, (2, 7))
    assert torch.equal(decoder.generate(ids, 10), reference(model, ids, 10))
    assert torch.equal(decoder.generate(ids, 10), reference(model, ids, 10))  # second call: no stale outputs

"""transformers features beyond the basic forward (output selection, logits_to_keep tensors, packed positions,
continuous batching), each against transformers' built-in VaultGemma (the oracle) with the same weights."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import AttentionInterface, GenerationConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM
from vaultgemma_hf.generation import CompiledGreedyDecoder

from conftest import tiny_config_kwargs

ATOL = 1e-5


def make_pair(kwargs: dict | None = None, attn: str = "eager"):
    """Our model and the built-in one with identical random weights (norm weights non-zero), in eval mode."""
    kwargs = kwargs or tiny_config_kwargs()
    torch.manual_seed(0)
    ours = VaultGemmaForCausalLM(VaultGemmaConfig(**kwargs, attn_implementation=attn))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.2)
    ref = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**kwargs, attn_implementation=attn))
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def test_logits_to_keep_2d_tensors_match_builtin():
    """2-D `logits_to_keep`: integer positions per row, or a boolean mask (flattened), as transformers slices."""
    ours, ref = make_pair()
    ids = torch.randint(3, 97, (2, 7))
    per_row = torch.tensor([[0, 3], [1, 6]])
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, [2, 5]] = True
    mask[1, 4] = True
    with torch.no_grad():
        if ref(ids, logits_to_keep=per_row).logits.ndim != 3:
            pytest.skip(f"transformers {transformers.__version__}'s built-in has no per-row logits_to_keep to compare")
        for keep, shape in ((per_row, (2, 2, 97)), (mask, (3, 97))):
            logits = ours(ids, logits_to_keep=keep).logits
            expected = ref(ids, logits_to_keep=keep).logits
            assert logits.shape == expected.shape == shape
            assert (logits - expected).abs().max() <= ATOL


@pytest.mark.parametrize("selection", [1, [0, -1], -1, 0, [7]])
def test_output_hidden_states_selection_matches_builtin(selection):
    """`output_hidden_states` as index / indices returns only those hidden states (None elsewhere)."""
    ours, ref = make_pair()
    ids = torch.randint(3, 97, (2, 5))
    with torch.no_grad():
        if ref(ids, output_hidden_states=1).hidden_states[0] is not None:  # older versions: an int is a flag
            pytest.skip(f"transformers {transformers.__version__}'s built-in has no hidden-state selection to compare")
        got = ours(ids, output_hidden_states=selection).hidden_states
        expected = ref(ids, output_hidden_states=selection).hidden_states
    if expected is None:  # 0 selects nothing in transformers (falsy flag)
        assert got is None
        return
    assert [h is None for h in got] == [h is None for h in expected]
    for a, b in zip(got, expected):
        assert a is None or (a - b).abs().max() <= ATOL


def test_attentions_of_a_backend_without_weights_match_builtin():
    """A backend that returns no attention weights gives an empty tuple, not a tuple of None."""

    def no_weights_attention(*args, **kwargs):  # SDPA under a custom name (the built-in refuses "sdpa" itself)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("review_no_weights", no_weights_attention)
    ours, ref = make_pair(attn="review_no_weights")
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        got = ours(ids, output_attentions=True)
        expected = ref(ids, output_attentions=True)
    assert expected.attentions == () and got.attentions == ()
    assert (got.logits - expected.logits).abs().max() <= ATOL


def test_packed_rows_longer_than_max_positions_match_builtin():
    """Packed documents restart their positions: a row longer than the limit is fine if its positions are."""
    ours, ref = make_pair(tiny_config_kwargs(max_position_embeddings=16))
    ids = torch.randint(3, 97, (2, 20))
    packed = torch.cat([torch.arange(10), torch.arange(6), torch.arange(4)]).expand(2, -1)
    with torch.no_grad():
        for use_cache in (False, True):
            got = ours(ids, position_ids=packed, use_cache=use_cache).logits
            expected = ref(ids, position_ids=packed, use_cache=use_cache).logits
            assert (got - expected).abs().max() <= ATOL
        # positions beyond the limit are still refused, with or without explicit positions
        with pytest.raises(ValueError, match="max_position_embeddings=16.*positions up to 19"):
            ours(ids, position_ids=torch.arange(20).expand(2, -1))
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            ours(ids)


def test_continuous_batching_generate_batch_matches_builtin():
    """`generate_batch` (paged cache, as `transformers serve` uses) needs the attention kwargs in `cache.update`."""
    if "page_size" not in inspect.signature(transformers.ContinuousBatchingConfig).parameters:
        pytest.skip(f"transformers {transformers.__version__} has another continuous-batching configuration")
    ours, ref = make_pair()
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    generation = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = transformers.ContinuousBatchingConfig(
        page_size=16, num_blocks=8, max_batch_tokens=32, max_requests_per_batch=2, use_async_batching=False
    )
    results = []
    for model in (ours, ref):
        model.set_attn_implementation("paged|eager")
        out = model.generate_batch(
            inputs=prompts, generation_config=generation, continuous_batching_config=batching, warmup=False
        )
        results.append([out[key].generated_tokens for key in sorted(out)])
    assert [len(tokens) for tokens in results[1]] == [4, 4]  # the built-in generated (requests did not fail)
    assert results[0] == results[1]


def test_compiled_decoder_refuses_zero_new_tokens():
    """As transformers' `generate`, max_new_tokens < 1 is refused (the prefill used to return one token anyway)."""
    ours, ref = make_pair()
    ids = torch.randint(3, 97, (1, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ref.generate(ids, max_new_tokens=0, do_sample=False)
    decoder = CompiledGreedyDecoder(ours, max_cache_len=16, compile=False)
    for new_tokens in (0, -1):
        with pytest.raises(ValueError, match="max_new_tokens must be greater than 0"):
            decoder.generate(ids, new_tokens)
    expected = ref.generate(ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(decoder.generate(ids, 1), expected)

"""VaultGemma model classes against transformers' built-in implementation (the oracle)."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import transformers
from transformers.cache_utils import StaticCache

import vaultgemma_hf
from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM, VaultGemmaModel
from vaultgemma_hf.generation import CompiledGreedyDecoder
from vaultgemma_hf.models.vaultgemma.modeling_vaultgemma import CACHE_FIELD

from conftest import tiny_config_kwargs

ATOL = 1e-5

# Several random tiny shapes: MHA as released, GQA, sliding + softcapped Gemma-2-like, biased projections.
PARITY_CONFIGS = {
    "released_like": tiny_config_kwargs(),
    "gqa_3_layers": tiny_config_kwargs(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, head_dim=16),
    "sliding_softcap": tiny_config_kwargs(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=5,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "bias_untied_scalar": tiny_config_kwargs(
        attention_bias=True, tie_word_embeddings=False, query_pre_attn_scalar=16, hidden_size=48
    ),
}


def make_pair(kwargs: dict, seed: int = 0, attn: str = "eager"):
    """Our model and the built-in one with identical random weights (norm weights non-zero)."""
    torch.manual_seed(seed)
    ours = VaultGemmaForCausalLM(VaultGemmaConfig(**kwargs, attn_implementation=attn))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.2)
    ref = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**kwargs, attn_implementation="eager"))
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def test_defaults_are_the_released_1b():
    config = VaultGemmaConfig()
    expected = dict(
        vocab_size=256000,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.layer_types == ["full_attention"] * 26
    assert config.rope_parameters["rope_theta"] == 10000.0
    with torch.device("meta"):
        model = VaultGemmaForCausalLM(config)
    # Parameter count published for the release (tied head counted once).
    assert sum(p.numel() for p in model.parameters()) == 1_038_741_120
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=3, num_key_value_heads=2), "multiple of num_key_value_heads"),
        (dict(num_hidden_layers=3, layer_types=["full_attention"] * 2), "layer_types has 2 entries"),
        (dict(layer_types=["full_attention", "local"]), "unknown types"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(layer_types=["sliding_attention"] * 2, sliding_window=None), "sliding_window must be a positive"),
        (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping must be None"),
        (dict(pad_token_id=500), "pad_token_id (500) must lie in"),
        (dict(eos_token_id=[1, 10**7]), "eos_token_id ([1, 10000000]) must lie in"),
        (dict(hidden_activation="nope"), "hidden_activation 'nope' is not a transformers activation"),
        (dict(rope_parameters={"rope_type": "bogus", "rope_theta": 10000.0}), "unknown rope_type 'bogus'"),
    ],
)
def test_config_validation(overrides, message):
    kwargs = tiny_config_kwargs()
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        VaultGemmaConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_loss_and_gradients_match_builtin(name):
    ours, ref = make_pair(PARITY_CONFIGS[name], seed=len(name))
    ours.train(), ref.train()
    ids = torch.randint(3, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    labels = ids.clone()
    labels[0, :4] = -100
    out_ours = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    out_ref = ref(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert (out_ours.logits - out_ref.logits).abs().max() <= ATOL
    assert torch.allclose(out_ours.loss, out_ref.loss, atol=ATOL, rtol=0)
    assert len(out_ours.hidden_states) == len(out_ref.hidden_states)
    for h_ours, h_ref in zip(out_ours.hidden_states, out_ref.hidden_states):
        assert (h_ours - h_ref).abs().max() <= ATOL
    out_ours.loss.backward()
    out_ref.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for param_name, param in ours.named_parameters():
        other = ref_grads[param_name].grad
        assert (param.grad - other).abs().max() <= ATOL * max(1.0, other.abs().max().item()), param_name


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_greedy_generation_matches_builtin(name):
    ours, ref = make_pair(PARITY_CONFIGS[name], seed=1)
    prompt = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


def test_parallelism_plans_and_tying_match_builtin():
    """Class-level metadata transformers reads (TP/PP/FSDP plans, tying, device-map splits) is the built-in's."""
    for cls_name in ("VaultGemmaModel", "VaultGemmaForCausalLM"):
        ours, ref = getattr(vaultgemma_hf, cls_name), getattr(transformers, cls_name)
        for attr in ("_tp_plan", "_pp_plan", "_fsdp_plan", "_tied_weights_keys", "_no_split_modules"):
            if getattr(ref, attr, None) is not None:  # _fsdp_plan appears in transformers 5.23
                assert getattr(ours, attr) == getattr(ref, attr), (cls_name, attr)
    for attr in ("base_model_tp_plan", "base_model_pp_plan"):
        assert getattr(VaultGemmaConfig, attr) == getattr(transformers.VaultGemmaConfig, attr), attr


def test_sdpa_matches_eager_when_not_softcapped():
    eager, _ = make_pair(tiny_config_kwargs(num_key_value_heads=2), attn="eager")
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        diff = (sdpa(ids, attention_mask=mask).logits - eager(ids, attention_mask=mask).logits).abs()
    assert diff[1, 3:].max() <= ATOL and diff[0].max() <= ATOL


def test_sdpa_with_sliding_layers_matches_builtin_eager():
    """SDPA on sliding-window layers (no softcap, so no fallback): sequences longer than the window, left padding."""
    kwargs = tiny_config_kwargs(
        num_hidden_layers=3,
        num_key_value_heads=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=3,
    )
    ours, ref = make_pair(kwargs, seed=3, attn="sdpa")
    ids = torch.randint(3, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row
    with torch.no_grad():
        diff = (ours(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits).abs()
    assert ours.config._attn_implementation == "sdpa"  # no fallback happened
    assert diff[0].max() <= ATOL and diff[1, 4:].max() <= ATOL
    prompt = torch.randint(3, 97, (2, 6))
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0
    generate = dict(attention_mask=prompt_mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **generate), ref.generate(prompt, **generate))
    assert ours.config._attn_implementation == "sdpa"


def test_sdpa_is_the_default_and_softcap_falls_back_to_eager(caplog):
    assert VaultGemmaForCausalLM(VaultGemmaConfig(**tiny_config_kwargs())).config._attn_implementation == "sdpa"
    kwargs = PARITY_CONFIGS["sliding_softcap"]
    ours, ref = make_pair(kwargs, attn="sdpa")
    ids = torch.randint(3, 97, (2, 9))
    assert ours.config._attn_implementation == "eager"  # switched when the model was built
    ours.set_attn_implementation("sdpa")  # asked again later: the next forward switches back, with a warning
    logging.Logger.warning_once.cache_clear()  # transformers' once-only warnings: forget earlier tests' messages
    with caplog.at_level("WARNING"), torch.no_grad():
        logits = ours(ids).logits
    assert ours.config._attn_implementation == "eager"
    assert "SDPA cannot softcap" in caplog.text
    assert (logits - ref(ids).logits).abs().max() <= ATOL


def test_static_cache_generation_matches_dynamic():
    ours, _ = make_pair(tiny_config_kwargs())
    prompt = torch.randint(3, 97, (2, 5))
    dynamic = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    static = ours.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    cache = StaticCache(config=ours.config, max_cache_len=20)
    with torch.no_grad():
        first = ours(prompt, past_key_values=cache, use_cache=True).logits
        full = ours(prompt).logits
    assert (first - full).abs().max() <= ATOL


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_kv_cache_incremental_matches_full_forward(name):
    """The cache is taken under either name (transformers >= 5.24 says `cache`, older ones `past_key_values`)."""
    ours, ref = make_pair(tiny_config_kwargs())
    ids = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        assert CACHE_FIELD in out and CACHE_FIELD in ref(ids[:, :6], use_cache=True)  # same output field as built-in
        cache = out[CACHE_FIELD]
        assert cache.get_seq_length() == 6
        step = ours(ids[:, 6:], use_cache=True, **{name: cache}).logits
        assert cache.get_seq_length() == 10
        with pytest.raises(ValueError, match="not both"):
            ours(ids[:, 6:], cache=cache, past_key_values=cache)
    assert (step - full[:, 6:]).abs().max() <= ATOL


def test_logits_to_keep():
    ours, _ = make_pair(tiny_config_kwargs())
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        full = ours(ids).logits
        assert torch.allclose(ours(ids, logits_to_keep=1).logits, full[:, -1:], atol=ATOL)
        keep = torch.tensor([0, 3])
        assert torch.allclose(ours(ids, logits_to_keep=keep).logits, full[:, keep], atol=ATOL)


def test_gradient_checkpointing_gives_same_gradients():
    ours, _ = make_pair(tiny_config_kwargs())
    ckpt = copy.deepcopy(ours)
    # transformers >= 5.23 renames it activation_checkpointing_enable (the old name warns); 5.17-5.22 have the old one.
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    ours.train(), ckpt.train()
    ids = torch.randint(3, 97, (2, 8))
    ours(ids, labels=ids).loss.backward()
    ckpt(ids, labels=ids).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_builtin(dtype):
    ours, ref = make_pair(tiny_config_kwargs())
    ours, ref = ours.to(dtype), ref.to(dtype)
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert a.dtype == dtype
    assert torch.equal(a, b)  # same ops in the same order: bit-identical on the same device


def test_prompt_longer_than_positions_is_refused():
    ours, _ = make_pair(tiny_config_kwargs(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        ours(torch.randint(3, 97, (1, 17)))
    prompt = torch.randint(3, 97, (1, 10))
    for cache in ("dynamic", "static"):  # the static path passes explicit positions: those are checked
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            ours.generate(prompt, max_new_tokens=10, do_sample=False, cache_implementation=cache)
        # the last new token is not fed back: 10 + 7 tokens use positions 0..15, the limit
        out = ours.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False, cache_implementation=cache)
        assert out.shape == (1, 17)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        CompiledGreedyDecoder(ours, max_cache_len=40, compile=False).generate(prompt, 10)
    assert CompiledGreedyDecoder(ours, max_cache_len=40, compile=False).generate(prompt, 7).shape == (1, 17)
    ours(torch.randint(3, 97, (1, 16)))  # exactly the limit is fine


def test_pickle_weights_are_refused_not_unpickled(tmp_path, monkeypatch):
    ours, _ = make_pair(tiny_config_kwargs())
    ours.config.save_pretrained(tmp_path)
    torch.save(ours.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("weights were unpickled"))
    with pytest.raises(OSError, match="model.safetensors"):
        VaultGemmaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("direction", ["ours_to_builtin", "builtin_to_ours"])
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_save_pretrained_round_trip(tmp_path, name, direction):
    kwargs = PARITY_CONFIGS[name]
    ours, ref = make_pair(kwargs, seed=len(name))
    src, dst_class = (
        (ours, transformers.VaultGemmaForCausalLM) if direction == "ours_to_builtin" else (ref, VaultGemmaForCausalLM)
    )
    src.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    # eager on both sides: same ops in the same order, so the logits are bit-identical
    loaded = dst_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    shape_keys = ("num_key_value_heads", "layer_types", "sliding_window", "attention_bias", "query_pre_attn_scalar")
    for key in shape_keys + ("attn_logit_softcapping", "final_logit_softcapping"):
        assert getattr(loaded.config, key) == getattr(src.config, key), key
    state = src.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for param_name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[param_name]), param_name
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, src(ids).logits)
    # tied stays one shared tensor, untied two distinct ones
    tied = kwargs["tie_word_embeddings"]
    assert loaded.config.tie_word_embeddings is tied
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    if not tied:  # the head was loaded as its own weights, not re-tied to (or copied from) the embeddings
        assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_device_map_loading(tmp_path):
    ours, _ = make_pair(tiny_config_kwargs())
    ours.save_pretrained(tmp_path)
    loaded = VaultGemmaForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"


def test_base_model_outputs_and_attentions():
    ours, ref = make_pair(tiny_config_kwargs())
    ids = torch.randint(3, 97, (1, 6))
    base = VaultGemmaModel(ours.config)
    base.load_state_dict(ours.model.state_dict())
    with torch.no_grad():
        out = base(ids, output_attentions=True)
        assert len(out.attentions) == ours.config.num_hidden_layers
        assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 4, 6), atol=1e-6)
        hidden = ours(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(out.last_hidden_state, hidden, atol=ATOL)
        as_tuple = ours(ids, return_dict=False)
        assert torch.equal(as_tuple[0], ours(ids).logits)


def test_output_attentions_on_sdpa_warns(caplog):
    ours, _ = make_pair(tiny_config_kwargs(), attn="sdpa")
    assert ours.config._attn_implementation == "sdpa"
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level("WARNING"), torch.no_grad():
        attentions = ours(torch.randint(3, 97, (1, 6)), output_attentions=True).attentions
    assert attentions == () and "needs eager attention" in caplog.text  # empty, as transformers' sdpa models give


@pytest.mark.parametrize("name", ["released_like", "sliding_softcap"])
def test_flex_attention_matches_builtin_eager(name):
    ours, ref = make_pair(PARITY_CONFIGS[name])
    ours.set_attn_implementation("flex_attention")
    assert ours.config._attn_implementation == "flex_attention"
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= ATOL

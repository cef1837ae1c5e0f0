# Copyright 2026 The vaultgemma-hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch VaultGemma: a Gemma-2 decoder with pre-norms only, trained from scratch with DP-SGD.

Read top to bottom: RMSNorm -> MLP -> rotary embedding -> attention -> decoder layer -> pretrained base ->
base model -> causal LM head. Numerically identical to transformers' built-in `VaultGemmaForCausalLM` (same
parameter names, same operation order), with three differences in behaviour:

* SDPA is supported whenever attention softcapping is off (the released 1B has none); a softcapped config that
  asks for SDPA falls back to eager attention with a warning instead of being refused.
* Inputs longer than `max_position_embeddings` are refused with a clear error (the model was trained on
  1024-token sequences; RoPE would silently extrapolate).
* `output_hidden_states` / `output_attentions` are collected explicitly here rather than by transformers'
  internal output-capturing decorators, so that only transformers' public API is used (same results: index
  selection of hidden states, an empty attentions tuple for backends that return no weights).

This file and `configuration_vaultgemma.py` are self-contained: they are copied next to saved checkpoints so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without `vaultgemma_hf` installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_vaultgemma import VaultGemmaConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated until 5.40); 5.17-5.23 know only `past_key_values`. Our forwards accept both names on every version, and
# talk to transformers (mask builders, output classes) in the name the installed version uses.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# Caches whose `update` takes the attention kwargs (transformers' paged cache for continuous batching requires them: it
# reads its read/write indices there and fills in what the paged attention kernel needs).
_CACHE_UPDATE_TAKES_KWARGS = "kwargs" in inspect.signature(Cache.update).parameters


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """Returns the KV cache passed under either name (`cache`, or the pre-5.24 `past_key_values`)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the KV cache once: as `cache` or as its older name `past_key_values`, not both.")
    return past_key_values


def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Selects the positions whose logits are computed, as transformers' causal LMs do.

    Args:
        hidden_states: Final hidden states `[batch, seq, hidden]`.
        logits_to_keep: An int `k` keeps the last `k` positions (0 keeps all); a 1-D tensor holds positions kept for
            every row; a 2-D integer tensor `[batch, n]` holds positions per row; a 2-D boolean tensor `[batch, seq]`
            keeps the `True` positions and flattens them to `[num_true, hidden]` (counts may differ per row).

    Returns:
        The selected hidden states.
    """
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)  # slice(0, None) keeps everything
    return hidden_states[:, logits_to_keep, :]


class VaultGemmaRMSNorm(nn.Module):
    """RMS norm with a zero-initialised weight used as `(1 + weight)`, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quirk: the whole norm, including the multiplication by (1 + weight), runs in float32 and is cast back at
        # the end (Llama casts before multiplying). This matches the JAX reference in bf16.
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class VaultGemmaMLP(nn.Module):
    """GeGLU feed-forward: `down(act(gate(x)) * up(x))`."""

    def __init__(self, config: VaultGemmaConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VaultGemmaRotaryEmbedding(nn.Module):
    """Rotary position embedding; returns (cos, sin) of shape [batch, seq, head_dim] in the input's dtype."""

    def __init__(self, config: VaultGemmaConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: VaultGemmaConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Inverse frequencies `1 / theta^(2i / head_dim)` of the original RoPE (no post-scaling)."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (Gemma's split-half convention, not interleaved pairs)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies RoPE to q and k of shape [batch, heads, seq, head_dim] (cos/sin broadcast over the heads)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * n_rep, seq, head_dim] (grouped-query attention)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: scores, optional tanh softcap, additive mask, fp32 softmax, weighted values."""
    if scaling is None:
        scaling = module.head_dim**-0.5
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # The softmax is upcast to fp32, then cast back to the query dtype.
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class VaultGemmaAttention(nn.Module):
    """Multi-head (grouped-query) self-attention with RoPE, scaled by `query_pre_attn_scalar ** -0.5`."""

    def __init__(self, config: VaultGemmaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )
        self.attn_logit_softcapping = config.attn_logit_softcapping
        # The release stores sliding_window=512 but every layer is full attention: the window applies only to
        # layers typed "sliding_attention".
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None

    def _attention_interface(self) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            # `kwargs=kwargs`: a paged cache (continuous batching, `generate_batch`) reads and updates them in place.
            cache_kwargs = {"kwargs": kwargs} if _CACHE_UPDATE_TAKES_KWARGS else {}
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, **cache_kwargs)

        attn_output, attn_weights = self._attention_interface()(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            softcap=self.attn_logit_softcapping,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class VaultGemmaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block without Gemma-2's post-norms: `h = x + attn(norm(x)); out = h + mlp(norm(h))`."""

    def __init__(self, config: VaultGemmaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = VaultGemmaAttention(config=config, layer_idx=layer_idx)
        self.mlp = VaultGemmaMLP(config)
        self.input_layernorm = VaultGemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_feedforward_layernorm = VaultGemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, attn_weights = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, attn_weights


class VaultGemmaTextScaledWordEmbedding(nn.Embedding):
    """Embedding lookup multiplied by `embed_scale` (= sqrt(hidden_size)) cast to the weight dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scalar_embed_scale = embed_scale
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Quirk: the scale is rounded to the weight dtype first (sqrt(1152) = 33.94 becomes 34.0 in bf16), exactly
        # as the reference does; multiplying by the fp32 scalar would give different bf16 embeddings.
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class VaultGemmaPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the capabilities transformers reads (attention backends, compile, offload)."""

    config_class = VaultGemmaConfig
    config: VaultGemmaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VaultGemmaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True  # softcapped configs fall back to eager inside the attention layer
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def _fall_back_from_sdpa_if_softcapped(self) -> None:
        """Softcapped configs cannot use SDPA (no tanh on the scores): switch to eager, once, with a warning.

        The switch is made on the config, not per layer, because the attention masks are built for the backend
        named there (SDPA may get no mask at all and rely on `is_causal`).
        """
        if self.config.attn_logit_softcapping is not None and self.config._attn_implementation == "sdpa":
            logger.warning_once(
                "VaultGemma: attn_logit_softcapping is set and SDPA cannot softcap attention scores; using eager "
                "attention instead (flash_attention_2 and flex_attention also support softcapping)."
            )
            self.config._attn_implementation = "eager"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, reading weights from safetensors files only by default.

        A checkpoint that has only pickle weights (`pytorch_model.bin`) is refused rather than unpickled; pass
        `use_safetensors=False` explicitly to accept it.
        """
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VaultGemmaRMSNorm):
            init.zeros_(module.weight)  # used as (1 + weight): identity at init
        elif isinstance(module, VaultGemmaTextScaledWordEmbedding):
            init.constant_(module.embed_scale, module.scalar_embed_scale)  # non-persistent buffer


class VaultGemmaModel(VaultGemmaPreTrainedModel):
    """The bare decoder: scaled embeddings, `num_hidden_layers` blocks and a final RMS norm."""

    def __init__(self, config: VaultGemmaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = VaultGemmaTextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, self.padding_idx, embed_scale=config.hidden_size**0.5
        )
        self.layers = nn.ModuleList(
            [VaultGemmaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = VaultGemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = VaultGemmaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()
        self._fall_back_from_sdpa_if_softcapped()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _selected_hidden_states(self, output_hidden_states: bool | int | list[int] | None) -> Callable | None:
        """None if no hidden states are wanted, else a predicate on the index (0 = embeddings) of the kept ones.

        Args:
            output_hidden_states: A flag, or the index / indices (negative ones count from the end) to return.
        """
        if not output_hidden_states:  # None, False, and (as in transformers) 0 or []
            return None
        if output_hidden_states is True:
            return lambda index: True
        indices = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
        count = self.config.num_hidden_layers + 1
        kept = {index % count for index in indices if -count <= index < count}
        return lambda index: index in kept

    def _check_length(self, needed: int, detail: str) -> None:
        """Refuses a call whose positions reach `max_position_embeddings` (`needed` positions; `detail` says why)."""
        if needed > self.config.max_position_embeddings:
            raise ValueError(
                f"VaultGemma attends over at most max_position_embeddings={self.config.max_position_embeddings} "
                f"positions (its training sequence length), but this call needs {needed} ({detail}). Truncate the "
                f"prompt (e.g. tokenizer(..., truncation=True, max_length={self.config.max_position_embeddings})) or "
                "lower max_new_tokens."
            )

    def _check_explicit_positions(self, seq_len: int, position_ids: torch.Tensor, cache: Cache | None) -> None:
        """Length policy for caller-given `position_ids`, syncing with the device only when needed.

        With a dynamic cache (or none) the count of positions follows from shapes (no device sync); only when that
        bound is over the limit are the positions themselves read (one sync), because packed rows (e.g.
        `DataCollatorWithFlattening`) restart their positions at each document: a row longer than the limit is fine
        if its positions stay within it. With another cache (a static one: generate's static path) the positions are
        always read. Inside `torch.compile` nothing is read: compiled decoding steps are checked by their caller
        (`CompiledGreedyDecoder` refuses prompt + new tokens beyond the limit up front; transformers' compiled static
        `generate` checks its eager prefill).
        """
        shape_bound = None
        if cache is None or isinstance(cache, DynamicCache):
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            shape_bound = past_seen_tokens + seq_len
            if shape_bound <= self.config.max_position_embeddings:
                return
        if not torch.compiler.is_compiling():
            largest = int(position_ids.max())  # the positions RoPE will see
            self._check_length(largest + 1, f"positions up to {largest}")
        elif shape_bound is not None:
            self._check_length(shape_bound, f"{past_seen_tokens} cached + {seq_len} new")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Runs the decoder.

        Args:
            input_ids: Token ids `[batch, seq]` (exactly one of `input_ids` / `inputs_embeds`).
            attention_mask: `[batch, seq_total]` padding mask (1 = attend), or masks already prepared by `generate`.
            position_ids: Positions `[batch, seq]`; by default continue after the cached tokens.
            cache: A transformers `Cache` (dynamic or static) to read and update.
            inputs_embeds: Pre-computed, already scaled embeddings `[batch, seq, hidden]`.
            use_cache: Whether to create/return a cache (defaults to `config.use_cache`).
            output_attentions: Return each layer's attention probabilities (eager attention only; other backends give
                an empty tuple, with a warning).
            output_hidden_states: Return the embeddings and each layer's output (the last one after the final norm);
                an index or a list of indices returns only those hidden states (the others are None).
            return_dict: Return a `BaseModelOutputWithPast` (default) or a tuple.
            past_key_values: The name of `cache` before transformers 5.24 (accepted on every version).

        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` after the final norm and the cache (in the field
            `cache` on transformers >= 5.24, `past_key_values` before).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        self._fall_back_from_sdpa_if_softcapped()  # also after a later set_attn_implementation("sdpa")
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"VaultGemma: output_attentions=True needs eager attention; the {self.config._attn_implementation!r} "
                "backend returns no attention probabilities (an empty tuple). Load or set the model with "
                "attn_implementation='eager' to get them."
            )
        cache = _one_cache(cache, past_key_values)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The backward pass replays each layer, which would write its keys/values into a cache a second time.
            if use_cache or cache is not None:
                logger.warning_once("VaultGemma: a KV cache is not used with gradient checkpointing in training.")
            use_cache, cache = False, None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        # Length policy: refuse to attend beyond max_position_embeddings (RoPE would silently extrapolate).
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            self._check_length(past_seen_tokens + seq_len, f"{past_seen_tokens} cached + {seq_len} new")
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        else:
            self._check_explicit_positions(seq_len, position_ids, cache)

        # `generate` may pass the masks already built, keyed by layer type.
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                _MASK_CACHE_KWARG: cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        # As transformers' output capturing: `output_hidden_states` may also be an index or a list of indices into the
        # num_hidden_layers + 1 hidden states; unselected ones are returned as None.
        keep_hidden = self._selected_hidden_states(output_hidden_states)
        all_hidden_states = () if keep_hidden is not None else None
        all_attentions = () if output_attentions else None
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if keep_hidden is not None:
                all_hidden_states += (hidden_states if keep_hidden(i) else None,)
            hidden_states, attn_weights = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
            # Backends other than eager return no weights (None): left out, so that the tuple is empty, as in
            # transformers' models.
            if output_attentions and attn_weights is not None:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if keep_hidden is not None:
            all_hidden_states += (hidden_states if keep_hidden(self.config.num_hidden_layers) else None,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class VaultGemmaForCausalLM(VaultGemmaPreTrainedModel, GenerationMixin):
    """VaultGemma with its language-modelling head (tied to the input embeddings in the release)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # read by transformers >= 5.23's FSDP2 integration

    def __init__(self, config: VaultGemmaConfig):
        super().__init__(config)
        self.model = VaultGemmaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Runs the decoder and the LM head.

        Args:
            labels: Token ids `[batch, seq]` for the next-token loss (shifted inside; -100 is ignored).
            logits_to_keep: If an int `k > 0`, compute logits for the last `k` positions only (0 = all); a 1-D
                tensor of positions kept in every row, a 2-D integer tensor `[batch, n]` of positions per row, or a
                2-D boolean mask `[batch, seq]` (logits flattened to `[num_true, vocab]`). Saves the
                `[batch, seq, vocab]` logits during generation.
            **kwargs: As for `VaultGemmaModel.forward`, plus attention-backend kwargs and loss kwargs
                (e.g. `num_items_in_batch`).

        Returns:
            `CausalLMOutputWithPast` with `logits` (and `loss` when `labels` are given).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()


__all__ = ["VaultGemmaForCausalLM", "VaultGemmaModel", "VaultGemmaPreTrainedModel"]

# Copyright 2026 The vaultgemma-hf authors. Licensed under the Apache License, Version 2.0.
"""VaultGemma configuration.

Self-contained on purpose: this file (with `modeling_vaultgemma.py`) is copied next to checkpoints saved by our
classes so that they load with `trust_remote_code=True` where `vaultgemma_hf` is not installed. It must therefore
import nothing from `vaultgemma_hf`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

LAYER_TYPES = ("full_attention", "sliding_attention")


class VaultGemmaConfig(PreTrainedConfig):
    r"""Configuration of a VaultGemma model.

    The defaults are the released `google/vaultgemma-1b` checkpoint (1,038,741,120 parameters): 26 pre-norm Gemma-2
    blocks of width 1152, 4 query and 4 key/value heads of size 256, GeGLU MLP of width 6912, every layer full
    attention, no logit softcapping, tied embeddings, 1024 positions. (transformers' built-in `VaultGemmaConfig()`
    defaults to a Gemma-2-2B-like shape instead; both classes read the same `config.json`.)

    Args:
        vocab_size: Size of the vocabulary (rows of the tied embedding / LM head).
        hidden_size: Width of the residual stream.
        intermediate_size: Width of each of the gate and up projections of the GeGLU MLP.
        num_hidden_layers: Number of decoder blocks.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention when smaller than the query heads).
        head_dim: Size of each attention head (not necessarily `hidden_size // num_attention_heads`).
        hidden_activation: Activation of the gate projection (`gelu_pytorch_tanh` in the release).
        max_position_embeddings: Number of positions the model was trained on; longer inputs are refused.
        initializer_range: Standard deviation of the normal initialiser of linear and embedding weights.
        rms_norm_eps: Epsilon of the RMS norms.
        use_cache: Whether `forward` returns key/value caches by default.
        pad_token_id: Padding token id.
        eos_token_id: End-of-sequence token id(s).
        bos_token_id: Beginning-of-sequence token id.
        tie_word_embeddings: Whether the LM head shares the embedding matrix (it does in the release).
        rope_parameters: RoPE parameters (`{"rope_type": "default", "rope_theta": 10000.0}` by default).
        attention_bias: Whether the q/k/v/o projections have a bias.
        attention_dropout: Dropout on the attention probabilities.
        query_pre_attn_scalar: Attention scores are scaled by `query_pre_attn_scalar ** -0.5`.
        sliding_window: Window of the layers whose type is `sliding_attention`. The release stores 512 here but has
            no sliding layers, so it is never applied to it.
        layer_types: Attention type of each layer, `full_attention` or `sliding_attention`.
        final_logit_softcapping: If set, logits become `cap * tanh(logits / cap)`.
        attn_logit_softcapping: If set, attention scores are soft-capped the same way (the SDPA kernel cannot do
            this: such models fall back to eager attention, with a warning).

    Example:

    ```python
    >>> from vaultgemma_hf import VaultGemmaConfig, VaultGemmaForCausalLM
    >>> config = VaultGemmaConfig()  # the released 1B shape
    >>> tiny = VaultGemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32)
    >>> model = VaultGemmaForCausalLM(tiny)
    ```
    """

    model_type = "vaultgemma"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache (named `cache` from transformers 5.24)
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 256000
    hidden_size: int = 1152
    intermediate_size: int = 6912
    num_hidden_layers: int = 26
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """Validates the configuration; every message says which field is wrong and why."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VaultGemmaConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"VaultGemmaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"VaultGemmaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"VaultGemmaConfig.layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}: give one attention type per layer."
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(
                f"VaultGemmaConfig.layer_types has unknown types {unknown}; allowed: {list(LAYER_TYPES)}."
            )
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(
                "VaultGemmaConfig.sliding_window must be a positive integer when a layer is 'sliding_attention', "
                f"got {self.sliding_window!r}."
            )
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"VaultGemmaConfig.{name} must be None (off) or positive, got {value!r}.")
        if not self.query_pre_attn_scalar > 0:
            raise ValueError(
                f"VaultGemmaConfig.query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}."
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"VaultGemmaConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}.")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"VaultGemmaConfig.attention_dropout must be in [0, 1), got {self.attention_dropout}.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for token_id in value if isinstance(value, (list, tuple)) else [value]:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"VaultGemmaConfig.{name} ({value}) must lie in [0, vocab_size={self.vocab_size})."
                    )
        if self.hidden_activation not in ACT2FN:
            raise ValueError(
                f"VaultGemmaConfig.hidden_activation {self.hidden_activation!r} is not a transformers activation "
                "(the release uses 'gelu_pytorch_tanh')."
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"VaultGemmaConfig.rope_parameters has unknown rope_type {rope_type!r}; allowed: "
                f"{['default', *sorted(ROPE_INIT_FUNCTIONS)]}."
            )


__all__ = ["VaultGemmaConfig"]

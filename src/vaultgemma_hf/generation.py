"""Fast greedy decoding: static KV cache + a `torch.compile`d one-token step (CUDA graphs on GPU).

Why not `torch.compile(model.forward, mode="reduce-overhead")` with a static cache? Every call then replays one
CUDA graph whose output buffers are reused, so the logits returned by step t are overwritten by step t + 1
("accessing tensor output of CUDAGraphs that has been overwritten"). The recipe here avoids that by:

1. running the prefill eagerly (variable length; it also allocates the static cache),
2. compiling a *decode step* that returns only the next token ids (argmax inside the graph, no logits escape),
3. marking each step as a new CUDA-graph iteration (`torch.compiler.cudagraph_mark_step_begin()`) and cloning the
   step's output before the next replay.

Works with any causal LM whose forward accepts `position_ids`, a KV cache (`cache`, or `past_key_values` before
transformers 5.24) and `logits_to_keep` (VaultGemma from this package or transformers). Greedy only, unpadded prompts of equal length.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# The keyword a model's forward takes its KV cache under: `cache` from transformers 5.24, `past_key_values` before.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CompiledGreedyDecoder:
    """Greedy generation with a static cache and a compiled decode step.

    Args:
        model: A causal LM (eval mode) on its target device and dtype.
        max_cache_len: Prompt length + new tokens upper bound (the static cache size).
        compile: Compile the decode step (`False` runs the same code eagerly, e.g. for tests).
        mode: `torch.compile` mode; "reduce-overhead" uses CUDA graphs on GPU.

    Example:
        >>> decoder = CompiledGreedyDecoder(model, max_cache_len=prompt_len + 128)
        >>> tokens = decoder.generate(input_ids, max_new_tokens=128)  # [batch, prompt_len + 128]
    """

    def __init__(self, model: nn.Module, max_cache_len: int, *, compile: bool = True, mode: str = "reduce-overhead"):
        self.model = model
        self.max_cache_len = max_cache_len
        self.cache: StaticCache | None = None
        self._cache_batch = 0
        self._compiled = compile
        self._step = torch.compile(self._decode_step, mode=mode, fullgraph=True) if compile else self._decode_step

    def _decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=True, **{CACHE_KWARG: self.cache}
        ).logits
        return logits[:, -1, :].argmax(dim=-1, keepdim=True)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Returns `input_ids` followed by `max_new_tokens` greedy tokens (no early stop at EOS)."""
        batch, prompt_len = input_ids.shape
        if max_new_tokens < 1:  # as transformers' generate: the prefill below always yields one token
            raise ValueError(f"max_new_tokens must be greater than 0, but is {max_new_tokens}.")
        if prompt_len + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_cache_len ({self.max_cache_len})"
            )
        # The compiled step skips the model's own position check (no device sync inside the graph): check here. The
        # last new token is not fed back, so positions 0 .. prompt_len + max_new_tokens - 2 are used, as in generate.
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and prompt_len + max_new_tokens - 1 > limit:
            raise ValueError(
                f"The model attends over at most max_position_embeddings={limit} positions, but prompt ({prompt_len}) + "
                f"max_new_tokens ({max_new_tokens}) needs {prompt_len + max_new_tokens - 1}. Shorten the prompt or "
                "lower max_new_tokens."
            )
        if self.cache is None or self._cache_batch != batch:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            self._cache_batch = batch
        else:
            self.cache.reset()
        device = input_ids.device
        positions = torch.arange(prompt_len, device=device).unsqueeze(0).expand(batch, -1)
        logits = self.model(
            input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: self.cache}
        ).logits
        token = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        out = [input_ids, token]
        for step in range(1, max_new_tokens):
            position = torch.full((batch, 1), prompt_len + step - 1, device=device, dtype=torch.long)
            if self._compiled:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._step(token, position).clone()
            out.append(token)
        return torch.cat(out, dim=1)

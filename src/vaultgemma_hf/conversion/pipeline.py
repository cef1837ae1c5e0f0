"""`convert()`: read a checkpoint in any supported format, optionally merge an adapter, write another format.

Every conversion goes through the HF state dict in memory:

    JAX (Orbax / .npz) --jax_to_hf--> HF state --[merge_lora]--[cast]--> HF directory
    HF directory ------------------> HF state --[merge_lora]--[cast]--hf_to_jax--> JAX (Orbax / .npz)

Outputs are atomic (written beside DST and renamed at the end, after `verify` passed).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .atomic import atomic_output
from .config import SHAPE_KEYS, infer_config, make_config, parse_overrides, vaultgemma_deviations
from .errors import ConversionError
from .io_hf import (
    DEFAULT_SHARD_SIZE,
    is_hf_dir,
    parse_size,
    pickle_only_weights,
    read_hf,
    read_hf_config,
    tokenizer_files_from,
    write_hf,
)
from .io_jax import is_npz, is_orbax_dir, read_jax, write_jax
from .layout import (
    EMBEDDING,
    Dims,
    JaxLayout,
    check_keys,
    check_shape,
    expected_hf_shapes,
    hf_to_jax,
    jax_to_hf,
    strip_tied_head,
)
from .lora import build_model, check_adapter_dir, load_peft_model, merge_lora
from .tensors import cast_state, dominant_dtype, dtype_name, parse_dtype
from .verify import DEFAULT_RTOL, VerifyResult, compare_logits, hf_logits, random_prompts, verify_against_reference

logger = logging.get_logger(__name__)

FORMATS = ("hf", "orbax", "npz")


class VerificationError(ConversionError):
    """`verify=True` found logits outside tolerance; nothing was written."""

    def __init__(self, results: list[VerifyResult]):
        self.results = results
        super().__init__("verification failed, nothing was written:\n" + "\n".join(r.summary() for r in results))


@dataclass
class ConversionReport:
    """What `convert` did.

    Attributes:
        source: Source path.
        source_format: `"hf"`, `"orbax"` or `"npz"`.
        destination: Output path.
        target_format: `"hf"`, `"orbax"` or `"npz"`.
        config: The VaultGemma config of the model.
        jax_layout: The JAX layout read or written (None for HF -> HF without a recorded one).
        dtype: dtype name of most weights in the output.
        num_parameters: Parameters of the HF model (tied embedding counted once).
        files: Files written (HF outputs).
        merged_adapter: The adapter directory merged, if any.
        verify: Verification results (empty without `verify=True`).
        notes: Warnings worth repeating in a summary.
    """

    source: str
    source_format: str
    destination: str
    target_format: str
    config: Any
    jax_layout: JaxLayout | None
    dtype: str
    num_parameters: int
    files: list[str] = field(default_factory=list)
    merged_adapter: str | None = None
    verify: list[VerifyResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"converted {self.source} ({self.source_format}) -> {self.destination} ({self.target_format})",
            f"  {self.num_parameters:,} parameters, {self.config.num_hidden_layers} layers, hidden "
            f"{self.config.hidden_size}, vocab {self.config.vocab_size}, dtype {self.dtype}",
        ]
        if self.jax_layout is not None:
            lines.append(
                f"  JAX layout: {self.jax_layout.attention} attention, gating {self.jax_layout.gating}, "
                f"{self.jax_layout.embedding_rows or self.config.vocab_size} embedding rows"
            )
        if self.merged_adapter:
            lines.append(f"  merged adapter {self.merged_adapter}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  {result.summary()}" for result in self.verify]
        return "\n".join(lines)


def detect_format(path: str | os.PathLike) -> str:
    """`"hf"` (directory with config.json + safetensors), `"orbax"` (Orbax checkpoint dir) or `"npz"`."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if is_hf_dir(path):
        return "hf"
    if is_npz(path):
        return "npz"
    if is_orbax_dir(path):
        return "orbax"
    pickles = pickle_only_weights(path)
    if pickles:
        raise ConversionError(f"{path} has only pickle weights ({', '.join(pickles)}); only safetensors are read")
    raise ConversionError(
        f"cannot tell the format of {path}: expected an HF directory (config.json + model.safetensors or "
        "model.safetensors.index.json), an Orbax checkpoint directory or a .npz file"
    )


def _hf_config_with_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    if not overrides:
        return config
    sizes = sorted(set(overrides) & set(SHAPE_KEYS))
    if sizes:
        raise ConversionError(f"--override cannot change the sizes of an HF checkpoint ({', '.join(sizes)})")
    values = {
        k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type", "transformers_version")
    }
    values.update(overrides)
    return make_config(values)


def _check_hf_state(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    state = strip_tied_head(state)
    expected = expected_hf_shapes(Dims.from_config(config))
    check_keys(state, expected, "HF checkpoint")
    for key, shape in expected.items():
        check_shape(key, state[key], shape)
    return state


def _check_options_against_config(
    config: Any, verify: bool, verify_seq_len: int, to: str, jax_vocab_size: int | None
) -> None:
    """Refuses options that contradict the model's config, as soon as it is known (before merging or writing)."""
    max_positions = getattr(config, "max_position_embeddings", None)
    if verify and max_positions is not None and verify_seq_len > max_positions:
        raise ConversionError(
            f"--verify-length {verify_seq_len} is longer than the model's max_position_embeddings = {max_positions}"
        )
    if to == "jax" and jax_vocab_size is not None and jax_vocab_size < config.vocab_size:
        raise ConversionError(
            f"--jax-vocab-size {jax_vocab_size} is smaller than vocab_size = {config.vocab_size} (the rows of the "
            "HF embedding)"
        )


def _target_layout(
    config: Any,
    recorded: JaxLayout | None,
    attention_layout: str | None,
    gating_layout: str | None,
    jax_vocab_size: int | None,
) -> JaxLayout:
    dims = Dims.from_config(config)
    default_attention = "fused" if dims.num_kv_heads == dims.num_heads else "split"
    rows = jax_vocab_size
    if rows is None:
        rows = (recorded.embedding_rows if recorded else None) or dims.vocab_size
    return JaxLayout(
        attention=attention_layout or (recorded.attention if recorded else default_attention),
        gating=(gating_layout or (recorded.gating if recorded else "FD")).upper(),
        embedding_rows=rows,
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | Mapping[str, Any] | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    tokenizer: str | os.PathLike | None = None,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    merge_adapter: str | os.PathLike | None = None,
    attention_layout: str | None = None,
    gating_layout: str | None = None,
    jax_vocab_size: int | None = None,
    jax_format: str | None = None,
    drop_post_norms: bool = False,
    verify: bool = False,
    verify_prompts: int = 3,
    verify_seq_len: int = 16,
    verify_seed: int = 0,
    verify_rtol: float = DEFAULT_RTOL,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport:
    """Converts a VaultGemma checkpoint between the JAX gemma layout (Orbax / .npz) and HF safetensors.

    Args:
        src: Source checkpoint; its format is detected (`detect_format`).
        dst: Output path (must not exist unless `overwrite`).
        to: `"hf"` or `"jax"`; default: the other family than `src` (`"hf"` for JAX sources, `"jax"` for HF),
            except with `merge_adapter` (default `"hf"`). `"hf"` from an HF source re-saves (dtype change,
            re-sharding, adapter merge).
        dtype: `"fp32"`, `"bf16"` or None/`"auto"` (keep the source's dtypes).
        config: JAX sources only: a preset (`"vaultgemma-1b"`, `"tiny"`), a config.json path or a dict, checked
            against the shapes.
        overrides: `KEY=VALUE` config overrides (sizes only for JAX sources, where they must match the shapes).
        tokenizer: HF outputs: tokenizer directory or file to copy (default: the HF source's tokenizer files).
        shard_size: HF outputs: maximum shard size (e.g. `"5GB"`).
        merge_adapter: A PEFT adapter directory to merge into the source weights.
        attention_layout: JAX side: `"fused"` or `"split"` (output default: as recorded in the HF directory,
            else fused when K == N).
        gating_layout: JAX side: `"FD"` or `"DF"` (source: required only when F == D; output default: as
            recorded, else FD).
        jax_vocab_size: JAX outputs: rows of the embedding table (pads with the recorded rows, else zeros).
        jax_format: JAX outputs: `"orbax"` or `"npz"` (default from DST: `.npz` suffix -> npz).
        drop_post_norms: JAX sources: drop post-attention/post-ffw norms instead of refusing.
        verify: Compare logits of the HF side with the numpy reference over the JAX side before renaming.
        verify_prompts: Random prompts for `verify`.
        verify_seq_len: Tokens per prompt.
        verify_seed: Seed of the prompts.
        verify_rtol: Tolerance relative to max(1, max |logit|).
        overwrite: Replace an existing DST.
        progress: Show progress bars.

    Returns:
        A `ConversionReport`.

    Raises:
        ConversionError: anything wrong with the inputs or options (message names the key/option/file).
        VerificationError: `verify` failed (nothing written).
        MissingDependencyError: Orbax or PEFT needed but not installed.
    """
    src_format = detect_format(src)
    src_family = "hf" if src_format == "hf" else "jax"
    to = to or ("hf" if src_family == "jax" or merge_adapter is not None else "jax")
    if to not in ("hf", "jax"):
        raise ConversionError(f"--to must be hf or jax, got {to!r}")
    if src_family == "jax" and to == "jax" and merge_adapter is None:
        raise ConversionError(f"{src} is already in the JAX layout: convert it --to hf (and back if needed)")
    out_dtype = parse_dtype(dtype)
    if to == "jax" and tokenizer is not None:
        raise ConversionError("--tokenizer applies to HF outputs only (JAX checkpoints hold parameters only)")
    if to == "hf" and (jax_vocab_size is not None or jax_format is not None or attention_layout is not None):
        raise ConversionError("--jax-vocab-size, --jax-format and --attention-layout apply to JAX outputs only")
    if src_family == "hf" and (config is not None or drop_post_norms):
        raise ConversionError("--config and --drop-post-norms apply to JAX sources only (HF has config.json)")
    if jax_vocab_size is not None and (isinstance(jax_vocab_size, bool) or int(jax_vocab_size) < 1):
        raise ConversionError(f"--jax-vocab-size must be a positive number of rows, got {jax_vocab_size}")
    if verify and (verify_prompts < 1 or verify_seq_len < 1):
        raise ConversionError("--verify-prompts and --verify-length must be >= 1")
    override_values = parse_overrides(overrides)
    # Cheap checks first: a typo should not cost a 1B-parameter read.
    if Path(dst).exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    parse_size(shard_size)
    explicit_tokenizer = tokenizer_files_from(tokenizer) if tokenizer is not None else None
    if merge_adapter is not None:
        check_adapter_dir(merge_adapter)
    if src_family == "hf":  # the config is known before the weights are read
        early_config = _hf_config_with_overrides(read_hf_config(src), override_values)
        _check_options_against_config(early_config, verify, verify_seq_len, to, jax_vocab_size)
    notes: list[str] = []

    # ---- read
    recorded_layout, padding_rows, generation_config, tokenizer_files = None, None, None, []
    source_jax: dict[str, torch.Tensor] | None = None
    if src_family == "jax":
        source_jax, _ = read_jax(src)
        values = infer_config(
            {k: tuple(v.shape) for k, v in source_jax.items()}, base=config, overrides=override_values
        )
        model_config = make_config(values)
        _check_options_against_config(model_config, verify, verify_seq_len, to, jax_vocab_size)
        result = jax_to_hf(source_jax, model_config, gating_layout=gating_layout, drop_post_norms=drop_post_norms)
        state, recorded_layout, padding_rows = result.state_dict, result.layout, result.padding_rows
        for key in recorded_layout.dropped_keys:
            del source_jax[key]
        if recorded_layout.dropped_keys:
            msg = (
                f"dropped {len(recorded_layout.dropped_keys)} post-norm tensor(s) (--drop-post-norms): the HF "
                "model computes the blocks without them"
            )
            logger.warning(msg)
            notes.append(msg)
        if padding_rows is not None:
            msg = (
                f"{EMBEDDING} has {recorded_layout.embedding_rows} rows; kept the first {model_config.vocab_size} "
                f"(vocab_size). The {padding_rows.shape[0]} padding rows (max |value| "
                f"{float(padding_rows.abs().max()):.3g}) are kept beside the weights for the way back"
            )
            logger.warning(msg)
            notes.append(msg)
    else:
        checkpoint = read_hf(src, progress=progress)
        model_config = _hf_config_with_overrides(checkpoint.config, override_values)
        state = _check_hf_state(checkpoint.state_dict, model_config)
        recorded_layout, padding_rows = checkpoint.jax_layout, checkpoint.padding_rows
        generation_config = checkpoint.generation_config
        tokenizer_files = [(f, f.name) for f in checkpoint.tokenizer_files]
        deviations = vaultgemma_deviations(model_config)
        if deviations and to == "jax":
            msg = f"the HF config departs from VaultGemma ({'; '.join(deviations)}); a JAX VaultGemma will differ"
            logger.warning(msg)
            notes.append(msg)
    source_dtype = dominant_dtype(state)

    # ---- merge
    merged_state = None
    if merge_adapter is not None:
        merged_state = merge_lora(state, model_config, merge_adapter)
        tokenizer_files = tokenizer_files_from_optional(merge_adapter) or tokenizer_files
        if out_dtype is None:
            out_dtype = source_dtype
    if explicit_tokenizer is not None:
        tokenizer_files = explicit_tokenizer
    out_state = cast_state(merged_state if merged_state is not None else state, out_dtype)
    num_parameters = sum(v.numel() for v in out_state.values())

    report = ConversionReport(
        source=str(src),
        source_format=src_format,
        destination=str(dst),
        target_format="hf",
        config=model_config,
        jax_layout=recorded_layout,
        dtype=dtype_name(dominant_dtype(out_state)),
        num_parameters=num_parameters,
        merged_adapter=str(merge_adapter) if merge_adapter else None,
        notes=notes,
    )
    verify_kwargs = {
        "num_prompts": verify_prompts,
        "seq_len": verify_seq_len,
        "seed": verify_seed,
        "rtol": verify_rtol,
    }

    # ---- write (+ verify before the rename)
    with atomic_output(dst, overwrite=overwrite) as work:
        if to == "hf":
            report.files = write_hf(
                work,
                out_state,
                model_config,
                shard_size=shard_size,
                generation_config=generation_config,
                tokenizer_files=tokenizer_files,
                jax_layout=recorded_layout,
                padding_rows=padding_rows,
                progress=progress,
            )
            if verify:
                if source_jax is not None and merged_state is None:
                    # JAX -> HF: the source checkpoint itself, rounded like the output.
                    reference_params = cast_state(source_jax, out_dtype)
                    gating = recorded_layout.gating
                else:  # the written weights (merged or re-saved) in the JAX layout
                    reference_params = hf_to_jax(out_state, model_config)
                    gating = "FD"
                report.verify.append(
                    verify_against_reference(
                        work, reference_params, model_config, gating, progress=progress, **verify_kwargs
                    )
                )
        else:
            layout = _target_layout(model_config, recorded_layout, attention_layout, gating_layout, jax_vocab_size)
            pad = padding_rows
            rows = layout.embedding_rows - model_config.vocab_size
            if pad is not None and tuple(pad.shape) != (rows, model_config.hidden_size):
                pad = None
            if rows > 0 and pad is None:
                notes.append(f"padded the JAX embedding with {rows} zero rows to {layout.embedding_rows}")
            jax_params = hf_to_jax(out_state, model_config, layout, padding_rows=pad)
            fmt = jax_format or ("npz" if str(dst).endswith(".npz") else "orbax")
            report.target_format = fmt
            report.jax_layout = layout
            write_jax(jax_params, work, fmt)
            del jax_params
            if verify:
                written, _ = read_jax(work)  # what a user restoring the output gets
                hf_model = build_model(model_config, merged_state if merged_state is not None else state)
                report.verify.append(
                    verify_against_reference(
                        hf_model,
                        written,
                        model_config,
                        layout.gating,
                        round_hf_to=out_dtype,
                        progress=progress,
                        **verify_kwargs,
                    )
                )
        if verify and merged_state is not None:
            report.verify.append(_verify_merge(state, merged_state, model_config, merge_adapter, **verify_kwargs))
        failed = [r for r in report.verify if not r.passed]
        if failed:
            raise VerificationError(report.verify)
    return report


def tokenizer_files_from_optional(directory: str | os.PathLike) -> list[tuple[Path, str]]:
    """Tokenizer files in a directory, or an empty list when it has none."""
    try:
        return tokenizer_files_from(directory)
    except ConversionError:
        return []


def _verify_merge(
    base_state: Mapping[str, torch.Tensor],
    merged_state: Mapping[str, torch.Tensor],
    config: Any,
    adapter_dir: str | os.PathLike,
    *,
    num_prompts: int,
    seq_len: int,
    seed: int,
    rtol: float,
) -> VerifyResult:
    """Logits of the merged fp32 weights vs the unmerged PEFT model (base + adapter applied on the fly)."""
    tokens = random_prompts(config.vocab_size, num_prompts, seq_len, seed)
    peft_model = load_peft_model(build_model(config, base_state), adapter_dir)
    reference = hf_logits(peft_model, tokens)
    merged = hf_logits(build_model(config, merged_state), tokens)
    return compare_logits(merged, reference, rtol=rtol, what="merged weights vs PEFT model with the adapter")

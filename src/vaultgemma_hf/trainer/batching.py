"""Glue between the DP batch sampler and a `DataLoader`: padding slots and the per-example mask.

[`DPBatchSampler`] yields lists of dataset indices in which [`PAD_INDEX`] marks a padding slot (truncated Poisson
keeps fixed physical shapes) and which may be empty (a Poisson micro-batch with no sampled sequence).
[`MaskedDataset`] resolves a padding slot to a stand-in example, and [`MaskedCollator`] collates with the user's
collator and adds ``dp_example_mask``: True for sampled examples, False for padding. Padding never contributes
to the gradient (its loss is multiplied by 0 and the engine is given the mask).

The collator must keep one row per example: the engine clips per row, so a collator that merges several sampled
examples into one row (e.g. `DataCollatorWithFlattening`, which concatenates the micro-batch into a single padding-free
row) would clip their joint gradient once and, when the micro-batch is processed in several chunks, feed the merged
row to every chunk, so one example could contribute several clipped gradients (sensitivity above C). Every tensor of a
collated batch must therefore have the number of examples as its leading dimension ([`check_rows`]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vaultgemma_hf.dp.sampling import PAD_INDEX

EXAMPLE_MASK_KEY = "dp_example_mask"


class MaskedDataset(Dataset):
    """Wraps a map-style dataset so that index [`PAD_INDEX`] returns a masked stand-in example.

    Items are ``(example, is_real)`` pairs. The stand-in is ``dataset[0]``; it is only there to keep shapes
    fixed and is masked out.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, bool]:
        if index == PAD_INDEX:
            return self.dataset[0], False
        if index < 0:
            raise IndexError(f"Negative dataset index {index}.")
        return self.dataset[index], True


class MaskedCollator:
    """Collates ``(example, is_real)`` pairs with `collator` and adds the boolean ``dp_example_mask``.

    An empty micro-batch is collated as the stand-in example with its batch dimension sliced to 0, so that it
    still carries every key with the right trailing shapes.
    """

    def __init__(self, collator: Callable[[list], Mapping[str, Any]], stand_in: Any) -> None:
        self.collator = collator
        self.stand_in = stand_in

    def __call__(self, pairs: Sequence[tuple[Any, bool]]) -> dict[str, Any]:
        if len(pairs) == 0:
            batch = dict(self.collator([self.stand_in]))
            batch = {k: v[:0] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()}
            batch[EXAMPLE_MASK_KEY] = torch.zeros(0, dtype=torch.bool)
            return batch
        batch = dict(self.collator([example for example, _ in pairs]))
        check_rows(batch, len(pairs))
        batch[EXAMPLE_MASK_KEY] = torch.tensor([bool(is_real) for _, is_real in pairs], dtype=torch.bool)
        return batch


def check_rows(batch: Mapping[str, Any], num_examples: int) -> None:
    """Raises unless every tensor of `batch` with a dimension has one row per example (leading size `num_examples`).

    DP-SGD clips the gradient of each row; a row that holds several examples (merged or flattened by the collator)
    breaks the per-example sensitivity bound, so such batches are refused rather than trained on.

    Args:
        batch: a collated batch.
        num_examples: the number of examples that were collated.

    Raises:
        ValueError: a tensor's leading dimension differs from `num_examples` (the message names the key).
    """
    bad = [
        f"{key} {tuple(value.shape)}"
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != num_examples
    ]
    if bad:
        raise ValueError(
            f"The data collator returned tensors without one row per example ({num_examples} examples collated): "
            f"{', '.join(bad)}. DPTrainer clips each row's gradient as one privacy unit, so a collator that merges, "
            "flattens (e.g. DataCollatorWithFlattening) or splits examples would break the per-example sensitivity "
            "bound. Use a collator that stacks one example per row (DataCollatorForPackedSequences)."
        )


def slice_batch(batch: Mapping[str, Any], start: int, stop: int, batch_size: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor whose first dimension is the batch (other values unchanged)."""
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch_size else v
        for k, v in batch.items()
    }

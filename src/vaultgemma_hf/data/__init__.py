"""Data utilities: packing documents into the fixed-length sequences that DP-SGD protects."""

from vaultgemma_hf.data.documents import read_documents
from vaultgemma_hf.data.packing import (
    DataCollatorForPackedSequences,
    PackedDataset,
    check_sequence_length,
    group_indices_by_user,
    pack_documents,
    token_ids_sha256,
)

__all__ = [
    "DataCollatorForPackedSequences",
    "PackedDataset",
    "check_sequence_length",
    "group_indices_by_user",
    "pack_documents",
    "read_documents",
    "token_ids_sha256",
]

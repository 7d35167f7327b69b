"""Tokenization and batching. Batches are padded to their longest note, not to max_length."""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from tasks.audit.canaries import CANARY_COLUMN


def tokenize(records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
             max_length: int) -> datasets.Dataset:
    """Token ids and labels only (and the audit's canary ids, where there are canaries): the
    text column is dropped once tokenized."""
    keep = ("label", CANARY_COLUMN)
    encoded = records.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True, remove_columns=[c for c in records.column_names if c not in keep])
    return encoded.rename_column("label", "labels")


def make_loader(tokenized: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(tokenized.with_format("torch"), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=DataCollatorWithPadding(tokenizer), generator=generator)

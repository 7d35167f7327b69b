"""Tokenization and batching. A batch is padded to its longest note, never to max_length.

Length grouping puts notes of similar length in the same batch, so that batch pads less:
for non-private training, transformers' ``LengthGroupedSampler`` (a random permutation,
sorted by length within mega-batches of a few batches each; every record still once per
epoch), and for evaluation the records in order of length. DP-SGD never uses it: Opacus
replaces the sampler with Poisson sampling, whose random membership and batch sizes are
what the accountant assumes.
"""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

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


def token_lengths(tokenized: datasets.Dataset) -> list[int]:
    return [len(ids) for ids in tokenized["input_ids"]]


def make_loader(tokenized: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                batch_size: int, shuffle: bool, seed: int = 0,
                group_by_length: bool = False) -> DataLoader:
    """Batches padded to their longest note. ``group_by_length``: with ``shuffle``, similar
    lengths batched together in a random order; without, the records longest first."""
    records = tokenized.with_format("torch")
    collate = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    if not group_by_length:
        return DataLoader(records, batch_size=batch_size, shuffle=shuffle,
                          collate_fn=collate, generator=generator)
    lengths = token_lengths(tokenized)
    if shuffle:
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
    else:
        sampler = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return DataLoader(records, batch_size=batch_size, sampler=sampler, collate_fn=collate)

"""Tokenization and batching. A batch is padded to its longest note, never to max_length.

With ``chunk`` (model.long_notes=chunk) a note longer than the window becomes overlapping
windows (``stride`` tokens shared, at most ``max_chunks``): a record holds its windows, and a
batch of N notes holds all their windows side by side with ``window_note`` saying whose each
is (tasks/model/windows.py pools them back). A note that fits is one window: exactly the
truncating tokenization.

Length grouping puts notes of similar length in the same batch, so that batch pads less:
for non-private training, transformers' ``LengthGroupedSampler`` (a random permutation,
sorted by length within mega-batches of a few batches each; every record still once per
epoch), and for evaluation the records in order of length. DP-SGD never uses it: Opacus
replaces the sampler with Poisson sampling, whose random membership and batch sizes are
what the accountant assumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from clinical_fl.settings.model import LongNotes, ModelSettings
from tasks.audit.canaries import CANARY_COLUMN
from tasks.errors import TaskInputError
from tasks.model.windows import WINDOW_NOTE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunking:
    stride: int  # tokens consecutive windows share
    max_chunks: int  # windows per note at most


def chunking_for(settings: ModelSettings) -> Chunking | None:
    """The windows model settings ask for; None: truncate at max_length."""
    if settings.long_notes == LongNotes.truncate:
        return None
    return Chunking(stride=settings.stride(), max_chunks=settings.max_chunks)


def note_windows(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                 chunking: Chunking) -> tuple[list[list[list[int]]], int]:
    """Each note's windows of token ids, and how many notes were cut at ``max_chunks``."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, stride=chunking.stride,
                        return_overflowing_tokens=True)
    windows: list[list[list[int]]] = [[] for _ in texts]
    for ids, note in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"],
                         strict=True):
        windows[note].append(ids)
    capped = sum(len(w) > chunking.max_chunks for w in windows)
    return [w[:chunking.max_chunks] for w in windows], capped


def tokenize(records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
             max_length: int, chunking: Chunking | None = None) -> datasets.Dataset:
    """Token ids and labels only (and the audit's canary ids, where there are canaries): the
    text column is dropped once tokenized. ``chunking``: whole notes in windows."""
    keep = ("label", CANARY_COLUMN)
    drop = [c for c in records.column_names if c not in keep]
    if chunking is None:
        encoded = records.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
            batched=True, remove_columns=drop)
        return encoded.rename_column("label", "labels")
    if not tokenizer.is_fast:
        raise TaskInputError("model.long_notes=chunk needs a fast tokenizer (overlapping "
                             "windows); set model.long_notes=truncate")
    capped = 0

    def windows(batch: dict) -> dict:
        nonlocal capped
        ids, cut = note_windows(tokenizer, batch["text"], max_length, chunking)
        capped += cut
        return {"input_ids": ids}

    encoded = records.map(windows, batched=True, remove_columns=drop)
    if capped:
        log.warning("%d of %d notes are longer than %d windows; their tail is not read "
                    "(model.max_chunks)", capped, len(records), chunking.max_chunks)
    return encoded.rename_column("label", "labels")


def is_chunked(tokenized: datasets.Dataset) -> bool:
    feature = tokenized.features["input_ids"]
    return isinstance(getattr(feature, "feature", None), datasets.Sequence | datasets.List)


def token_lengths(tokenized: datasets.Dataset) -> list[int]:
    if is_chunked(tokenized):
        return [sum(map(len, windows)) for windows in tokenized["input_ids"]]
    return [len(ids) for ids in tokenized["input_ids"]]


class WindowCollator:
    """Notes of windows -> one batch of windows padded to the longest, ``window_note`` saying
    whose each window is, labels (and canary ids) per note."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        windows = [list(map(int, w)) for r in records for w in r["input_ids"]]
        owner = [i for i, r in enumerate(records) for _ in r["input_ids"]]
        batch = dict(self.tokenizer.pad({"input_ids": windows}, return_tensors="pt"))
        if not windows:  # an empty draw (Poisson sampling): shaped, with no rows
            batch = {"input_ids": torch.zeros((0, 1), dtype=torch.long),
                     "attention_mask": torch.zeros((0, 1), dtype=torch.long)}
        batch[WINDOW_NOTE] = torch.tensor(owner, dtype=torch.long)
        batch["labels"] = torch.tensor([int(r["labels"]) for r in records], dtype=torch.long)
        if records and CANARY_COLUMN in records[0]:
            batch[CANARY_COLUMN] = torch.tensor([int(r[CANARY_COLUMN]) for r in records])
        return batch


def make_loader(tokenized: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                batch_size: int, shuffle: bool, seed: int = 0,
                group_by_length: bool = False) -> DataLoader:
    """Batches padded to their longest note. ``group_by_length``: with ``shuffle``, similar
    lengths batched together in a random order; without, the records longest first."""
    if is_chunked(tokenized):
        records, collate = tokenized, WindowCollator(tokenizer)
    else:
        records, collate = tokenized.with_format("torch"), DataCollatorWithPadding(tokenizer)
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

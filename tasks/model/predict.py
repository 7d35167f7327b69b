"""Classify notes with a trained adapter (base model + LoRA adapter in PEFT format)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.model.build import load_adapter


@dataclass
class Prediction:
    label: str
    probability: float


@torch.inference_mode()
def classify(adapter_dir: str | Path, texts: list[str], base_model: str | None = None,
             batch_size: int = 32) -> list[Prediction]:
    model, tokenizer, labels, max_length = load_adapter(adapter_dir, base_model)
    predictions = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True,
                          max_length=max_length, padding=True, return_tensors="pt")
        probs = model(**batch).logits.softmax(dim=-1)
        best = probs.argmax(dim=-1)
        predictions += [Prediction(labels[i], float(probs[row, i]))
                        for row, i in enumerate(best.tolist())]
    return predictions

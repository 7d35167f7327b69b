"""How a note becomes one vector for the classification head.

Hugging Face's BERT classifiers feed the head the [CLS] token through a
pooler layer. Sentence-transformers models such as all-MiniLM-L6-v2 were
trained to be read as the mean of their token vectors instead, and that mean
is the far more informative input for the head: on the default data it lifts
DP-SGD at epsilon 8 from one-class predictions to clearly learning (see
docs/benchmarks.md), with non-private accuracy unchanged.

``pooling: auto`` takes the mean where the model folder says it was trained
that way (sentence-transformers' ``1_Pooling/config.json``) and keeps the
model's own head otherwise. The mean covers real tokens only: a record's
vector never depends on how much padding its batch happened to need, which
per-record DP-SGD relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel

from clinical_fl.settings.model import Pooling
from tasks.errors import ModelNotFoundError


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token vectors the attention mask keeps. No parameters.

    BERT's encoder hands its pooler the hidden states only; the mask of the
    same forward pass is handed over by a pre-hook on the encoder (see
    ``use_mean_pooling``).
    """

    def __init__(self, pad_token_id: int | None) -> None:
        super().__init__()
        self.pad_token_id = pad_token_id
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("MaskedMeanPooler called without an attention mask")
        mask = self.mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def capture_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None or self.pad_token_id is None:
                raise RuntimeError("mean pooling needs an attention mask or input ids")
            mask = (input_ids != self.pad_token_id).long()
        self.mask = mask


def trained_with_mean_pooling(model_path: str) -> bool:
    """True where a sentence-transformers folder declares mean pooling."""
    config = Path(model_path) / "1_Pooling" / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        return False


def resolve_pooling(pooling: Pooling, model_path: str) -> Pooling:
    if pooling != Pooling.auto:
        return pooling
    return Pooling.mean if trained_with_mean_pooling(model_path) else Pooling.model


def use_mean_pooling(model: PreTrainedModel) -> None:
    """Replace the encoder's [CLS] pooler with the masked mean (BERT-style encoders)."""
    encoder = getattr(model, model.base_model_prefix, None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ModelNotFoundError(
            f"model.pooling=mean needs an encoder with a pooler layer (BERT family); "
            f"'{model.config.model_type}' has none. Use model.pooling=model")
    pooler = MaskedMeanPooler(model.config.pad_token_id)
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)

"""One hospital's local work: its records and a model, trained and evaluated round by round.

Building the model and tokenizing the records are the slow parts of a round,
so both are cached per process. The caches hold nothing that matters for
correctness: every round overwrites all trainable parameters with the global
adapter, and a fresh process rebuilds the same objects from the settings.
"""

from __future__ import annotations

import datasets
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from tasks.batches import make_loader, tokenize
from tasks.config import TaskSettings
from tasks.data import HospitalData, load_hospital_data
from tasks.evaluation import EvalOutcome, evaluate
from tasks.model import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.training import TrainOutcome, train_locally


def _key(*parts: object) -> str:
    return "|".join(OmegaConf.to_yaml(OmegaConf.structured(p)) if hasattr(p, "__dataclass_fields__")
                    else repr(p) for p in parts)


_MODELS: dict[str, tuple] = {}
_RECORDS: dict[str, tuple[HospitalData, datasets.Dataset, datasets.Dataset]] = {}


def _cached_model(key: str, settings: TaskSettings, labels: tuple[str, ...]):
    if key not in _MODELS:
        _MODELS.clear()  # one base model per process is enough memory
        tokenizer = load_tokenizer(settings.model)
        _MODELS[key] = build_model(settings.model, list(labels), settings.seed,
                                   tokenizer), tokenizer
    return _MODELS[key]


def _cached_records(key: str, settings: TaskSettings, labels: tuple[str, ...],
                    partition_id: int, num_partitions: int,
                    tokenizer: PreTrainedTokenizerBase
                    ) -> tuple[HospitalData, datasets.Dataset, datasets.Dataset]:
    if key not in _RECORDS:
        if len(_RECORDS) >= 16:
            _RECORDS.clear()
        data = load_hospital_data(settings.data, list(labels), partition_id, num_partitions)
        max_length = settings.model.max_length
        _RECORDS[key] = (data, tokenize(data.train, tokenizer, max_length),
                         tokenize(data.eval, tokenizer, max_length))
    return _RECORDS[key]


class Hospital:
    """Hospital ``partition_id`` of ``num_partitions``, configured by the server's settings."""

    def __init__(self, settings: TaskSettings, labels: list[str], partition_id: int,
                 num_partitions: int) -> None:
        self.settings = settings
        self.labels = list(labels)
        if settings.train.num_threads > 0:
            torch.set_num_threads(settings.train.num_threads)
        model_key = _key(settings.model, settings.seed, tuple(labels))
        self.model, self.tokenizer = _cached_model(model_key, settings, tuple(labels))
        data_key = _key(settings.data, settings.model, tuple(labels), partition_id,
                        num_partitions)
        self.data, self._train, self._eval = _cached_records(
            data_key, settings, tuple(labels), partition_id, num_partitions, self.tokenizer)

    def train(self, global_state: dict[str, torch.Tensor], server_round: int,
              proximal_mu: float = 0.0) -> tuple[dict[str, torch.Tensor], TrainOutcome]:
        """Start from the global adapter, train locally, return the new trainable state."""
        load_trainable_state(self.model, global_state)
        seed = self.settings.seed * 100_003 + server_round * 1_009 + self.data.hospital
        torch.manual_seed(seed)
        loader = make_loader(self._train, self.tokenizer, self.settings.train.batch_size,
                             shuffle=True, seed=seed)
        outcome = train_locally(self.model, loader, self.settings.train, proximal_mu)
        return trainable_state(self.model), outcome

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> EvalOutcome:
        """Score the global adapter on this hospital's held-out split."""
        load_trainable_state(self.model, global_state)
        loader = make_loader(self._eval, self.tokenizer, self.settings.train.eval_batch_size,
                             shuffle=False)
        return evaluate(self.model, loader, len(self.labels))

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
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from clinical_fl.settings.task import TaskSettings
from tasks.audit.canaries import CANARY_COLUMN, GradientCanaries, read_canaries, with_canaries
from tasks.data.hospital_data import HospitalData, load_hospital_data
from tasks.errors import TaskInputError
from tasks.learning.batches import chunking_for, make_loader, tokenize
from tasks.learning.evaluation import EvalOutcome, evaluate
from tasks.learning.training import TrainOutcome
from tasks.model.build import build_model, load_tokenizer, load_trainable_state
from tasks.model.compute import resolve_compute
from tasks.privacy.accounting import Step
from tasks.privacy.lattice import Lattice
from tasks.privacy.ledger import PrivacyLedger
from tasks.privacy.mechanisms import RoundInputs, record_level_privacy
from tasks.privacy.mechanisms.base import RoundArrays
from tasks.privacy.policy import HospitalPolicy


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
                    tokenizer: PreTrainedTokenizerBase, data_path: str | None
                    ) -> tuple[HospitalData, datasets.Dataset, datasets.Dataset]:
    if key not in _RECORDS:
        if len(_RECORDS) >= 16:
            _RECORDS.clear()
        data = load_hospital_data(settings.data, list(labels), partition_id, num_partitions,
                                  data_path)
        data.train = with_audit_canaries(settings, partition_id, data_path, data.train)
        max_length, chunking = settings.model.max_length, chunking_for(settings.model)
        _RECORDS[key] = (data, tokenize(data.train, tokenizer, max_length, chunking),
                         tokenize(data.eval, tokenizer, max_length, chunking))
    return _RECORDS[key]


def refuse_audit_in_deployment(settings: TaskSettings, partition_id: int,
                               owns_data: bool | str | None) -> None:
    """A real hospital never lets the server add records to its training set, nor name a file
    on its machine to read: the audit's canaries are for simulation only. ``owns_data``: the
    hospital reads its own data-path, or is deployed (node config ``data-path`` or
    ``state-dir``) or has a policy file (``HospitalPolicy.owns_data``): a deployed hospital
    with a state-dir and no data-path (synthetic notes) is deployed all the same."""
    if settings.audit.canaries_path and owns_data:
        raise TaskInputError(f"hospital {partition_id}: audit.canaries_path is set, but audit "
                             "canaries are for simulation only; a deployed hospital refuses them",
                             key="audit.canaries_path")


def with_audit_canaries(settings: TaskSettings, partition_id: int, data_path: str | None,
                        train: datasets.Dataset) -> datasets.Dataset:
    """The audited hospital's training records with the audit's canaries."""
    refuse_audit_in_deployment(settings, partition_id, data_path)
    audit = settings.audit
    if not audit.canaries_path or partition_id != audit.hospital:
        return train
    return with_canaries(train, read_canaries(audit.canaries_path))


class Hospital:
    """Hospital ``partition_id`` of ``num_partitions``, configured by the server's settings.

    ``data_path`` (deployment: the hospital's node config) is the hospital's own
    export, read whole instead of a partition of a shared corpus.
    """

    def __init__(self, settings: TaskSettings, labels: list[str], partition_id: int,
                 num_partitions: int, data_path: str | None = None) -> None:
        self.settings = settings
        self.labels = list(labels)
        if settings.train.num_threads > 0:
            torch.set_num_threads(settings.train.num_threads)
        # Before any loading: a device or precision this machine lacks fails here.
        self.compute = resolve_compute(settings.train)
        model_key = _key(settings.model, settings.seed, tuple(labels))
        self.model, self.tokenizer = _cached_model(model_key, settings, tuple(labels))
        self.model.to(self.compute.device)  # a no-op once it is there
        data_key = _key(settings.data, settings.model, settings.audit, tuple(labels),
                        partition_id, num_partitions, data_path)
        self.data, self._train, self._eval = _cached_records(
            data_key, settings, tuple(labels), partition_id, num_partitions, self.tokenizer,
            data_path)
        self.privacy = record_level_privacy(settings.privacy)
        self.canaries = None
        if CANARY_COLUMN in self.data.train.column_names:
            trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            # The record-level mechanism's clipping norm (DP-SGD's when there is none).
            section = settings.privacy.section(settings.privacy.mechanism)
            norm = settings.audit.canary_norm or (section or settings.privacy.dp_sgd
                                                  ).max_grad_norm
            self.canaries = GradientCanaries(
                trainable, read_canaries(settings.audit.canaries_path), norm)

    @property
    def is_private(self) -> bool:
        """Record-level DP of either kind: what leaves the hospital is what DP-SGD allows."""
        return self.privacy.private

    @property
    def train_records(self) -> datasets.Dataset:
        """The tokenized training records (token ids and labels) that ``train`` reads.
        Shared with the process cache: read them, do not change them."""
        return self._train

    @property
    def eval_records(self) -> datasets.Dataset:
        """The tokenized held-out records that ``evaluate`` reads (read only, as above)."""
        return self._eval

    def train(self, global_state: dict[str, torch.Tensor], server_round: int,
              proximal_mu: float = 0.0, ledger: PrivacyLedger | None = None,
              policy: HospitalPolicy | None = None,
              prior_history: list[Step] | tuple[Step, ...] = (), lr_factor: float = 1.0
              ) -> tuple[RoundArrays, TrainOutcome]:
        """One round from the global adapter under this run's record-level privacy
        (``self.privacy``, tasks/privacy/mechanisms/): the arrays to send (the new trainable
        state, or under distributed DP this hospital's share of the secure sum) and the
        round's outcome.

        Under record-level DP, ``ledger`` is this hospital's privacy ledger for the run; the
        steps taken are added to it. ``policy`` is the hospital's own, and
        ``prior_history`` its spending in earlier runs (its lifetime budget). A round
        that breaks either raises PrivacyBudgetError before any step.
        """
        inputs = RoundInputs(server_round, policy or HospitalPolicy(self.data.hospital), ledger,
                             prior_history, proximal_mu, lr_factor)
        return self.privacy.train(self, global_state, inputs)

    def begin_round(self, global_state: dict[str, torch.Tensor], server_round: int) -> int:
        """Load the global adapter and seed this round's dropout and shuffling; the seed."""
        load_trainable_state(self.model, global_state)
        # The run seed is known to the server: it drives dropout and the non-private path's
        # shuffling only. Privacy's sampling and noise draw from OS entropy (tasks/privacy/).
        seed = self.settings.seed * 100_003 + server_round * 1_009 + self.data.hospital
        torch.manual_seed(seed)
        return seed

    def training_loader(self, seed: int, group_by_length: bool) -> DataLoader:
        """The training records, shuffled by ``seed`` (DP-SGD replaces the sampler)."""
        return make_loader(self._train, self.tokenizer, self.settings.train.batch_size,
                           shuffle=True, seed=seed, group_by_length=group_by_length)

    def step_loader(self, global_state: dict[str, torch.Tensor]) -> DataLoader:
        """The global adapter loaded, and the training records in order: for a mechanism
        that samples them itself (distributed DP's Poisson batch)."""
        load_trainable_state(self.model, global_state)
        return make_loader(self._train, self.tokenizer, self.settings.train.batch_size,
                           shuffle=False)

    @property
    def share_lattice(self) -> Lattice | None:
        """SecAgg+'s lattice that distributed DP's shares are built on (None under CKKS)."""
        secure = self.settings.secure_aggregation
        if secure.mode.value != "secagg_plus":
            return None
        return Lattice(secure.clipping_range, secure.quantization_range)

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> EvalOutcome:
        """Score the global adapter on this hospital's held-out split."""
        load_trainable_state(self.model, global_state)
        loader = make_loader(self._eval, self.tokenizer, self.settings.train.eval_batch_size,
                             shuffle=False, group_by_length=self.settings.train.group_by_length)
        return evaluate(self.model, loader, len(self.labels), self.compute)


"""One hospital's local work: its records and a model, trained and evaluated round by round.

Building the model and tokenizing the records are the slow parts of a round,
so both are cached per process. The caches hold nothing that matters for
correctness: every round overwrites all trainable parameters with the global
adapter, and a fresh process rebuilds the same objects from the settings.
"""

from __future__ import annotations

import time

import datasets
import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from clinical_fl.settings.task import TaskSettings
from tasks.audit.canaries import CANARY_COLUMN, GradientCanaries, read_canaries, with_canaries
from tasks.data.hospital_data import HospitalData, load_hospital_data
from tasks.errors import TaskInputError
from tasks.learning.batches import chunking_for, make_loader, tokenize
from tasks.learning.evaluation import EvalOutcome, evaluate
from tasks.learning.training import PrivacyReport, TrainOutcome, train_locally
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.model.compute import resolve_compute
from tasks.privacy.accounting import Step
from tasks.privacy.distributed_dp import (
    clipped_gradient_sum,
    continuous_share,
    flat_signal,
    hospital_plan,
    lattice_share,
)
from tasks.privacy.dp_sgd import train_with_dp_sgd
from tasks.privacy.lattice import Lattice
from tasks.privacy.ledger import PrivacyLedger
from tasks.privacy.plan import (
    DpSgdPlan,
    PrivacyBudgetError,
    plan_dp_sgd,
    refuse_without_dp,
)
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
        data.train = _audit_canaries(settings, partition_id, data_path, data.train)
        max_length, chunking = settings.model.max_length, chunking_for(settings.model)
        _RECORDS[key] = (data, tokenize(data.train, tokenizer, max_length, chunking),
                         tokenize(data.eval, tokenizer, max_length, chunking))
    return _RECORDS[key]


def refuse_audit_in_deployment(settings: TaskSettings, partition_id: int,
                               data_path: str | None) -> None:
    """A real hospital (reading its own data-path) never lets the server add records to its
    training set: the audit's canaries are for simulation only."""
    if settings.audit.canaries_path and data_path:
        raise TaskInputError(f"hospital {partition_id}: audit.canaries_path is set, but audit "
                             "canaries are for simulation only; a deployed hospital refuses them",
                             key="audit.canaries_path")


def _audit_canaries(settings: TaskSettings, partition_id: int, data_path: str | None,
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
        self.canaries = None
        if CANARY_COLUMN in self.data.train.column_names:
            trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            norm = settings.audit.canary_norm or settings.privacy.dp_sgd.max_grad_norm
            self.canaries = GradientCanaries(
                trainable, read_canaries(settings.audit.canaries_path), norm)

    @property
    def uses_dp_sgd(self) -> bool:
        return self.settings.privacy.dp_sgd.enabled

    @property
    def uses_distributed_dp(self) -> bool:
        return self.settings.privacy.distributed_dp.enabled

    @property
    def is_private(self) -> bool:
        """Record-level DP of either kind: what leaves the hospital is what DP-SGD allows."""
        return self.uses_dp_sgd or self.uses_distributed_dp

    @property
    def train_records(self) -> datasets.Dataset:
        """The tokenized training records (token ids and labels) that ``train`` reads.
        Shared with the process cache: read them, do not change them."""
        return self._train

    @property
    def eval_records(self) -> datasets.Dataset:
        """The tokenized held-out records that ``evaluate`` reads (read only, as above)."""
        return self._eval

    def dp_sgd_plan(self, policy: HospitalPolicy | None = None,
                    ledger: PrivacyLedger | None = None,
                    prior_history: list[Step] | tuple[Step, ...] = ()) -> DpSgdPlan:
        """This hospital's DP-SGD plan; raises PrivacyBudgetError on settings it cannot keep."""
        return plan_dp_sgd(
            self.settings.privacy.dp_sgd, self.data.hospital, len(self.data.train),
            self.settings.train.batch_size, self.settings.train.local_epochs,
            self.settings.planned_rounds, policy,
            committed_noise_multiplier=ledger.noise_multiplier if ledger else None,
            prior_history=prior_history, run_history=ledger.history if ledger else ())

    def train(self, global_state: dict[str, torch.Tensor], server_round: int,
              proximal_mu: float = 0.0, ledger: PrivacyLedger | None = None,
              policy: HospitalPolicy | None = None,
              prior_history: list[Step] | tuple[Step, ...] = (), lr_factor: float = 1.0
              ) -> tuple[dict[str, torch.Tensor], TrainOutcome]:
        """Start from the global adapter, train locally, return the new trainable state.

        With DP-SGD, ``ledger`` is this hospital's privacy ledger for the run; the
        steps taken are added to it. ``policy`` is the hospital's own, and
        ``prior_history`` its spending in earlier runs (its lifetime budget). A round
        that breaks either raises PrivacyBudgetError before any step.
        """
        policy = policy or HospitalPolicy(self.data.hospital)
        refuse_without_dp(self.settings.privacy.dp_sgd, policy)
        load_trainable_state(self.model, global_state)
        # The run seed is known to the server: it drives dropout and the non-private path's
        # shuffling only. DP-SGD's sampling and noise draw from OS entropy (dp_sgd.py).
        seed = self.settings.seed * 100_003 + server_round * 1_009 + self.data.hospital
        torch.manual_seed(seed)
        # DP-SGD replaces the sampler with Poisson sampling: no length grouping there.
        loader = make_loader(self._train, self.tokenizer, self.settings.train.batch_size,
                             shuffle=True, seed=seed,
                             group_by_length=self.settings.train.group_by_length
                             and not self.uses_dp_sgd)
        if not self.uses_dp_sgd:
            held = set(self.data.train["label"])  # for the restricted softmax
            outcome = train_locally(self.model, loader, self.settings.train, proximal_mu,
                                    canaries=self.canaries, compute=self.compute,
                                    classes_held=[c in held for c in range(
                                        len(self.settings.data.labels))],
                                    absent_class_scale=self.settings.restricted_softmax_scale(),
                                    lr_factor=lr_factor)
            return trainable_state(self.model), outcome
        if ledger is None:
            raise ValueError("DP-SGD training needs the hospital's privacy ledger")
        if proximal_mu > 0:
            # The key is the round config's (clinical_fl/protocol/messages.py): a refusal names
            # only keys the hospital received.
            raise PrivacyBudgetError("FedProx's proximal term is not supported with DP-SGD",
                                     key="proximal-mu")
        plan = self.dp_sgd_plan(policy, ledger, prior_history)
        refusal = plan.budget_error(ledger.history, server_round)
        if refusal:
            raise refusal
        ledger.noise_multiplier, ledger.delta = plan.noise_multiplier, plan.delta
        outcome = train_with_dp_sgd(self.model, loader, self.settings.train,
                                    plan.noise_multiplier, plan.max_grad_norm,
                                    self.settings.privacy.dp_sgd.grad_sample_mode,
                                    ledger.history, canaries=self.canaries,
                                    compute=self.compute, lr_factor=lr_factor)
        ledger.rounds_trained.append(server_round)
        outcome.privacy = privacy_report(plan, ledger)
        return trainable_state(self.model), outcome

    def distributed_step(self, global_state: dict[str, torch.Tensor], server_round: int,
                         ledger: PrivacyLedger, policy: HospitalPolicy | None = None,
                         prior_history: list[Step] | tuple[Step, ...] = ()
                         ) -> tuple[dict[str, np.ndarray], TrainOutcome]:
        """This hospital's share of one distributed DP-SGD step (tasks/privacy/distributed_dp.py)
        per trainable parameter: minus its clipped gradient sum over the union's expected batch,
        plus its share of the noise; uint32 levels on SecAgg+'s lattice, or float64 values
        for CKKS. The secure sum over the hospitals is minus the round's noisy mean gradient.
        The step is in ``ledger`` before it leaves; a step the run's cap or the hospital's
        policy forbids raises PrivacyBudgetError."""
        policy = policy or HospitalPolicy(self.data.hospital)
        lattice = self.share_lattice
        dimension = sum(t.numel() for t in global_state.values())
        plan, as_steps = hospital_plan(self.settings.privacy.distributed_dp, self.data.hospital,
                                       len(self.data.train), policy, lattice, dimension,
                                       prior_history)
        refusal = as_steps.budget_error(ledger.history, server_round)
        if refusal:
            raise refusal
        start = time.perf_counter()
        load_trainable_state(self.model, global_state)
        loader = make_loader(self._train, self.tokenizer, self.settings.train.batch_size,
                             shuffle=False)
        clipped = clipped_gradient_sum(self.model, loader, plan, self.compute)
        if list(clipped) != list(global_state):
            raise TaskInputError(f"hospital {self.data.hospital}: the global adapter's arrays "
                                 "are not this model's trainable parameters")
        signal = flat_signal(clipped, plan)
        flat = (lattice_share(signal, plan, lattice) if lattice is not None
                else continuous_share(signal, plan))
        ledger.noise_multiplier, ledger.delta = plan.accounted_noise_multiplier, as_steps.delta
        ledger.add_step(plan.round_step())
        ledger.rounds_trained.append(server_round)
        share, offset = {}, 0
        for name, tensor in global_state.items():
            share[name] = flat[offset:offset + tensor.numel()].reshape(tuple(tensor.shape))
            offset += tensor.numel()
        outcome = TrainOutcome(loss=float("nan"), num_examples=len(self.data.train),
                               num_steps=1, seconds=time.perf_counter() - start)
        outcome.privacy = privacy_report(as_steps, ledger)
        outcome.privacy.epsilon_if_alone = plan.epsilon(ledger.steps, as_steps.delta,
                                                        as_steps.accountant, fallback=True)
        return share, outcome

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


def privacy_report(plan: DpSgdPlan, ledger: PrivacyLedger) -> PrivacyReport:
    return PrivacyReport(
        epsilon=plan.epsilon(ledger.history), delta=plan.delta,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        sample_rate=plan.sample_rate, steps=ledger.steps, max_epsilon=plan.max_epsilon,
        can_train_next_round=plan.refusal(ledger.history, 0) is None,
        lifetime_epsilon=plan.lifetime_epsilon(ledger.history),
        hospital_delta=plan.hospital_delta)

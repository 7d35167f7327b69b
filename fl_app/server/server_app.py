"""ServerApp: the coordinator's side of a federated run, from configuration to saved adapter.

Order matters: everything that can be wrong with the configuration, the model
or a hospital's data is found before the first round trains anything.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from clinical_fl.protocol.messages import TASK_KEY
from clinical_fl.secure_aggregation import ckks
from clinical_fl.serving.pyfunc import log_note_model
from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import (
    task_settings,
    task_settings_from_yaml,
    task_settings_to_yaml,
    to_run_settings,
)
from clinical_fl.settings.privacy import RecordLevelMechanism
from clinical_fl.settings.run import RunSettings
from clinical_fl.settings.run_config import compose_run_config
from clinical_fl.settings.secure_aggregation import SecureAggregationMode, SecureAggregationSettings
from clinical_fl.settings.strategy import HeadAggregation
from clinical_fl.settings.task import TaskSettings
from clinical_fl.settings.train import Device, LearningRateSchedule, Precision, TrainSettings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.per_class import safe_name
from clinical_fl.tracking.provenance import FlowerRun
from clinical_fl.tracking.run_tracker import RunTracker
from fl_app.console import RoundConsole, speak_for_the_server
from fl_app.server.class_weights import plan_class_weights
from fl_app.server.data_check import server_labels
from fl_app.server.early_stopping import EarlyStopping
from fl_app.server.grids.metered import MeteredGrid
from fl_app.server.grids.progress import ProgressGrid
from fl_app.server.grids.secure_aggregation import SecureAggregationGrid
from fl_app.server.head_aggregation import resolve_head_aggregation
from fl_app.server.preflight import HospitalReport, run_preflight, wait_for_hospitals
from fl_app.server.resume import Resume, config_tree, prepare_resume
from fl_app.server.round_checkpointer import RoundCheckpointer, state_root
from fl_app.server.round_end import CentralEvaluate, ClientLevelPrivacy, RoundEnd
from fl_app.server.run_summary import finished_run, summary
from strategies.central_dp import with_client_level_dp
from strategies.checkpoint import ServerCheckpoint
from strategies.class_wise_head import ClassWiseHead
from strategies.evaluation_schedule import EvaluateOnSchedule, EvaluationSchedule
from strategies.learning_rate_schedule import LearningRateScheduleStrategy
from strategies.metric_rules import MetricRules, evaluate_metrics_rules, train_metrics_rules
from strategies.privacy_budget import PrivacyBudgetGate, TrainingStopped
from strategies.registry import build_strategy
from strategies.round_offset import AfterRound
from strategies.strategy_state import restore_strategy_state
from strategies.update_check import UpdateCheck
from strategies.update_recorder import UpdateRecorder, audit_view
from tasks.data.hospital_data import load_server_test_set
from tasks.learning.batches import chunking_for
from tasks.learning.central_evaluation import CentralEvaluator
from tasks.model.build import (
    build_model,
    load_tokenizer,
    load_trainable_state,
    save_adapter,
    trainable_state,
)
from tasks.model.compute import resolve_compute
from tasks.model.windows import head_parameter_names
from tasks.privacy.distributed_dp import plan_distributed_dp
from tasks.privacy.lattice import Lattice

log = logging.getLogger(__name__)

app = ServerApp()


def planned_rounds_per_hospital(num_rounds: int, hospitals: int, fraction_train: float,
                                min_hospitals: int) -> int:
    """Rounds each hospital is expected to train in, as Flower samples them: per round
    max(int(hospitals x fraction_train), min_hospitals) of the hospitals. DP-SGD noise is
    calibrated over this many rounds; a hospital sampled more often is stopped by its budget."""
    sampled = min(hospitals, max(int(hospitals * fraction_train), min_hospitals))
    return max(1, math.ceil(num_rounds * sampled / hospitals))


def privacy_tag(settings: RunSettings) -> str:
    privacy, central = settings.privacy, settings.privacy.central_dp
    parts, section, name = [], privacy.section(privacy.mechanism), privacy.mechanism.value
    if section is not None:
        parts.append(f"{name}(epsilon={section.target_epsilon})"
                     if section.noise_multiplier is None
                     else f"{name}(noise={section.noise_multiplier})")
    if central.enabled:
        parts.append(f"central_dp(noise={central.noise_multiplier})")
    return "+".join(parts) or "none"


def evaluate_before_training(strategy: Strategy, grid: Grid, arrays: ArrayRecord,
                             config: ConfigRecord, timeout: float) -> None:
    """Round 0 of federated evaluation: the untrained adapter, scored by every hospital.

    Flower's loop evaluates federatedly only after round 1; the baseline that
    shows what training bought is this extra pass, using the strategy's own
    configure/aggregate methods.
    """
    replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, config, grid),
                                    timeout=timeout)
    strategy.aggregate_evaluate(0, replies)


@dataclass
class Federation:
    """What the server knows once the hospitals are checked: the settings each receives,
    and each hospital's preflight report."""

    task: TaskSettings
    task_config: ConfigRecord  # the task settings as every message carries them
    reports: list[HospitalReport]


@dataclass
class RunPlan:
    """The run as configured, before any hospital is asked: its composed configuration and
    overrides, settings, the resume it continues (if any), the label set, and the task
    settings the hospitals receive."""

    cfg: DictConfig
    overrides: list[str]
    settings: RunSettings
    resume: Resume | None
    labels: list[str]
    task: TaskSettings


def plan_run(context: Context) -> RunPlan:
    """Everything that can be wrong with the configuration, a resume or the server's data,
    found before any message."""
    # The typed run-config keys, then the ``overrides`` string (clinical_fl/settings/run_config.py).
    overrides, cfg = compose_run_config(context.run_config)
    settings = to_run_settings(cfg)
    resume = None
    if settings.resume:  # everything wrong with the resume is found before any message
        resume = prepare_resume(settings, overrides, project_root())
        cfg, overrides, settings = resume.cfg, resume.overrides, to_run_settings(resume.cfg)
    labels = server_labels(settings.data)  # path, columns, labels: before any hospital
    if resume:  # the planned rounds, DP plans and ledger entry the hospitals already have
        task = task_settings_from_yaml(resume.checkpoint.task_yaml)
        task.drill = settings.drill  # the one section of theirs a resume may change
    else:
        task = task_settings(cfg, labels)
        task.ledger_run = context.run_id
    return RunPlan(cfg, overrides, settings, resume, labels, task)


@app.main()
def main(grid: Grid, context: Context) -> None:
    speak_for_the_server()  # one line per event on the run's console (fl_app/console.py)
    plan = plan_run(context)
    cfg, overrides, settings, resume, labels, task = (
        plan.cfg, plan.overrides, plan.settings, plan.resume, plan.labels, plan.task)
    # Building the model here fails fast on a bad model id, and gives the initial adapter.
    tokenizer = load_tokenizer(task.model)
    model = build_model(task.model, labels, task.seed, tokenizer)

    with RunTracker(settings.tracking, project_root(),
                    resume.checkpoint.mlflow_run_id if resume else None, run_settings=settings,
                    overrides=overrides, flower=FlowerRun.of(context, grid)) as tracker:
        if resume:
            record_resume(tracker, resume, context.run_id)
        else:  # the settings that take effect as params; config/resolved_config.yaml
            tracker.log_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                               OmegaConf.to_yaml(cfg))
        metered = MeteredGrid(grid)
        hospital_names: dict[int, int] = {}  # node id -> hospital number, once checked
        grid = ProgressGrid(metered, lambda node: hospital_names.get(node, f"node {node}"))
        central = central_evaluation(settings, model, tokenizer, labels)
        federation = check_hospitals(grid, settings, task, tracker, plan_rounds=not resume)
        hospital_names.update({r.node_id: r.hospital for r in federation.reports})
        if not resume:  # a resumed run keeps the weights its hospitals trained with
            weigh_classes(federation, tracker)
        choose_head_aggregation(settings, federation, tracker, resumed=resume is not None)
        if settings.privacy.mechanism == RecordLevelMechanism.distributed_dp and not resume:
            plan_distributed_dp_for(settings, federation, tracker,
                                    sum(t.numel() for t in trainable_state(model).values()))
        secure_grid = secure_aggregation_grid(grid, settings, federation, tracker)
        train_rules, evaluate_rules = train_metrics_rules(), evaluate_metrics_rules()
        chain = server_strategy(settings, federation, tracker, train_rules, evaluate_rules,
                                head_parameter_names(model, len(labels)))
        schedule = EvaluationSchedule(settings.evaluate_every, settings.num_rounds)
        strategy = EvaluateOnSchedule(chain.strategy, schedule)
        initial = ArrayRecord(trainable_state(model))
        template = ServerCheckpoint(
            mlflow_run_id=tracker.run_id, round=0, num_rounds=settings.num_rounds,
            ledger_run=int(task.ledger_run), overrides=overrides,
            config=config_tree(cfg), task_yaml=task_settings_to_yaml(federation.task),
            arrays={})
        checkpointer = RoundCheckpointer(
            state_root(settings.checkpoint, settings.tracking, project_root()) / tracker.run_id,
            tracker, template, strategy, chain.gate, chain.check, chain.hospital_of,
            settings.checkpoint.log_artifact)
        round_end = RoundEnd(tracker, metered, train_rules, evaluate_rules, central,
                             settings.tracking.log_per_hospital, chain.client_level_privacy,
                             secure_grid.take_round_stats if secure_grid else None,
                             schedule.due, chain.check.take_round, checkpointer,
                             labels=labels)
        if resume:
            initial = restore_server_state(resume.checkpoint, chain, federation, tracker)
            round_end.latest_arrays = initial
        round_console = RoundConsole(round_end, lambda: tracker.history, settings.num_rounds)
        # Early stopping (non-private runs): sees each round before its checkpoint.
        stopping = EarlyStopping.for_run(settings, resume.checkpoint if resume else None)
        checkpointer.early_stopping = stopping
        train_federation(strategy, secure_grid or grid, initial, settings,
                         federation.task_config, round_console, tracker,
                         done=resume.checkpoint.round if resume else 0, early_stopping=stopping)
        tracker.log_round_plot()
        if settings.tracking.save_adapter:
            # The global adapter after the last round that was evaluated (round 0: initial);
            # under early stopping, the best round's.
            final = round_end.latest_arrays
            final = final if final is not None else initial
            save_final_adapter(model, stopping.final_arrays(final) if stopping else final, task,
                               labels, tracker)
    # After the MLflow run is closed (and its model's alias moved): what to do next.
    print(summary(finished_run(tracker, settings), project_root()), flush=True)


def record_resume(tracker: RunTracker, resume: Resume, flower_run_id: int) -> None:
    """Tags that say the MLflow run was resumed: when, from which round, by which Flower
    run, with which allowed changes. The round's figures are logged now if the crash came
    between the checkpoint and MLflow (the checkpoint holds them)."""
    checkpoint = resume.checkpoint
    count = int(tracker.tag("resumes") or 0) + 1
    changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in resume.changes.items()
                        if k != "resume")
    tracker.set_tags({"resumes": str(count), f"resume/{count}": (
        f"after round {checkpoint.round}, as Flower run {flower_run_id}"
        + (f"; changed: {changes}" if changes else ""))[:5000]})
    if checkpoint.metrics and checkpoint.round not in tracker.logged_steps("round/seconds"):
        tracker.log_round(checkpoint.round, checkpoint.metrics)
    tracker.history = dict(checkpoint.history)
    log.info("resuming MLflow run %s after round %d of %d", checkpoint.mlflow_run_id,
             checkpoint.round, checkpoint.num_rounds)


def restore_server_state(checkpoint: ServerCheckpoint, chain: StrategyChain,
                         federation: Federation, tracker: RunTracker) -> ArrayRecord:
    """The checkpoint's global adapter, and its strategy, gate and update-check state put
    back into the freshly built strategy (hospitals by number: node ids change)."""
    restore_strategy_state(chain.strategy, checkpoint.strategy_arrays,
                           checkpoint.strategy_state)
    for report in federation.reports:
        if report.hospital in checkpoint.excluded:
            chain.gate.exclude(report.node_id, checkpoint.excluded[report.hospital])
    chain.check.rejected_total = dict(checkpoint.rejections)
    return ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})


def central_evaluation(settings: RunSettings, model: PeftModel,
                       tokenizer: PreTrainedTokenizerBase,
                       labels: list[str]) -> CentralEvaluate | None:
    """The server's own test set scores every global adapter (None: no test set)."""
    test_set = load_server_test_set(settings.data, labels)
    if test_set is None:
        return None
    # train.device and train.precision are the hospitals' settings; the server evaluates on
    # what it has (its GPU when present, bf16 where native).
    compute = resolve_compute(TrainSettings(device=Device.auto, precision=Precision.auto))
    log.info("central evaluation computes on %s", compute.describe())
    evaluator = CentralEvaluator(model, tokenizer, test_set, len(labels),
                                 settings.model.max_length, settings.train.eval_batch_size,
                                 compute, settings.train.group_by_length,
                                 chunking_for(settings.model))
    return lambda arrays: evaluator(arrays.to_torch_state_dict())


def check_hospitals(grid: Grid, settings: RunSettings, task: TaskSettings,
                    tracker: RunTracker, plan_rounds: bool = True) -> Federation:
    """Wait for the hospitals, plan the rounds each trains in (DP-SGD calibrates its noise over
    them; a resumed run keeps the first run's plan), and run the preflight query; every
    hospital's report goes to MLflow."""
    strategy, timeout = settings.strategy, settings.strategy.round_timeout_s
    connected = wait_for_hospitals(grid, strategy.min_hospitals, timeout)
    if plan_rounds:
        task.planned_rounds = planned_rounds_per_hospital(
            settings.num_rounds, len(connected), strategy.fraction_train,
            strategy.min_hospitals)
    # Each hospital answers no more evaluations than this (round 0 and the scheduled ones).
    schedule = EvaluationSchedule(settings.evaluate_every, settings.num_rounds)
    task.planned_evaluations = sum(schedule.due(r) for r in range(settings.num_rounds + 1))
    task_config = ConfigRecord({TASK_KEY: task_settings_to_yaml(task)})
    reports = run_preflight(grid, task_config, strategy.min_hospitals, timeout)
    tracker.log_params({f"hospital_{r.hospital}": {
        "train_records": r.train_records, "eval_records": r.eval_records,
        "empty_texts_dropped": r.empty_texts_dropped,
        "label_counts": r.label_counts or "not shared (DP-SGD)"} for r in reports})
    tracker.log_params({"planned_rounds_per_hospital": task.planned_rounds})
    tracker.set_tags({"hospitals": str(len(reports)), "labels": ",".join(task.data.labels),
                      "privacy": privacy_tag(settings),
                      "secure_aggregation": settings.secure_aggregation.mode.value})

    def server_test_records() -> tuple[list[str], list[str]]:
        """The server's test rows of data.path, read again for their count and digest."""
        from tasks.data.loaders import load_records

        rows = load_records(settings.data).where_split(settings.data.test_split, keep=True)
        return rows.text, rows.label

    # Counts and digests only: each hospital taking part, and the server's test set.
    tracker.log_run_datasets(reports, task.data.labels, settings.data, server_test_records)
    return Federation(task, task_config, reports)


def weigh_classes(federation: Federation, tracker: RunTracker) -> None:
    """train.class_weighting=balanced: the class weights from the label counts the hospitals
    taking part reported (fl_app/server/class_weights.py), into the settings every train message
    carries; what was decided goes to MLflow."""
    taking_part = [r.label_counts for r in federation.reports if not r.declined]
    decision = plan_class_weights(federation.task, taking_part)
    weights = federation.task.train.class_weights
    if decision.startswith("balanced"):  # computed here, from exact or noisy counts
        federation.task_config = ConfigRecord({TASK_KEY: task_settings_to_yaml(federation.task)})
    tracker.log_params({"class_weights": {
        "source": decision,
        # a label as MLflow names it (a param name takes no "/" or "(")
        **({safe_name(label): round(w, 4) for label, w in zip(federation.task.data.labels,
                                                              weights, strict=True)}
           if weights else {})}})


def choose_head_aggregation(settings: RunSettings, federation: Federation, tracker: RunTracker,
                            resumed: bool) -> None:
    """strategy.head_aggregation resolved from the hospitals' label counts
    (fl_app/server/head_aggregation.py); a new run sends the hospitals the task with its restricted
    softmax, a resumed one keeps the task its hospitals trained with."""
    task = copy.deepcopy(federation.task) if resumed else federation.task
    before = task.train.absent_class_scale
    chosen = resolve_head_aggregation(
        settings, task, [r.label_counts for r in federation.reports if not r.declined])
    if resumed:
        return
    if task.train.absent_class_scale != before:
        federation.task_config = ConfigRecord({TASK_KEY: task_settings_to_yaml(task)})
    tracker.log_params({"head_aggregation": {"resolved": chosen.value}})


def hospitals_per_round(settings: RunSettings, taking_part: int) -> int:
    """How many hospitals Flower samples for a round's training."""
    strategy = settings.strategy
    return min(taking_part, max(int(taking_part * strategy.fraction_train),
                                strategy.min_hospitals))


def plan_distributed_dp_for(settings: RunSettings, federation: Federation,
                            tracker: RunTracker, dimension: int) -> None:
    """Distributed DP's plan, once, from the hospitals' record counts: the union's sampling
    rate, sigma calibrated for the planned rounds (as the hospitals account them: on
    SecAgg+'s lattice of ``dimension`` values), the threshold; written into the settings
    every train message carries (each hospital checks it against its own policy)."""
    wanted = federation.task.privacy.distributed_dp
    taking_part = [r for r in federation.reports if not r.declined]
    total = sum(r.train_records for r in taking_part)
    if wanted.expected_batch_size >= total:
        raise ConfigError(
            f"privacy.distributed_dp.expected_batch_size={wanted.expected_batch_size}: the "
            f"hospitals taking part hold {total} training records; a batch of all of them "
            "gains nothing from sampling. Choose a smaller expected batch.")
    threshold = settings.secure_aggregation.threshold_for(
        hospitals_per_round(settings, len(taking_part)))
    delta = wanted.target_delta or min(1e-5, 1 / (10 * total))
    secure = settings.secure_aggregation
    lattice = (Lattice(secure.clipping_range, secure.quantization_range)
               if secure.mode == SecureAggregationMode.secagg_plus else None)
    plan = plan_distributed_dp(
        wanted.target_epsilon if wanted.noise_multiplier is None else None, delta, total,
        wanted.expected_batch_size, federation.task.planned_rounds, wanted.max_grad_norm,
        threshold, wanted.accountant, wanted.noise_multiplier,
        lattice.step if lattice else None, dimension)
    wanted.noise_multiplier, wanted.sample_rate = plan.noise_multiplier, plan.sample_rate
    wanted.threshold, wanted.target_delta = plan.threshold, delta
    federation.task_config = ConfigRecord({TASK_KEY: task_settings_to_yaml(federation.task)})
    tracker.log_params({"distributed_dp_plan": {
        "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
        "threshold": plan.threshold, "delta": delta, "training_records": total,
        "noise_share_multiplier": plan.share_noise_multiplier,
        "accounted_noise_multiplier": plan.accounted_noise_multiplier,
        "lattice_step": plan.lattice_step or 0.0, "dimension": dimension}})
    log.info("distributed DP: sigma %.4g (accounted %.4g on the lattice) at q %.4g over %d "
             "rounds, each hospital adds sigma/sqrt(%d)", plan.noise_multiplier,
             plan.accounted_noise_multiplier, plan.sample_rate,
             federation.task.planned_rounds, plan.threshold)


def check_secagg_plus_graph(secure: SecureAggregationSettings, per_round: int,
                            threshold: int) -> None:
    """SecAgg+ against a malicious server: every hospital of a round shares with every other
    (the consistency round compares whole views, docs/secure-aggregation.md), and the
    threshold is a majority of them (each hospital refuses a smaller one)."""
    shares = secure.shares_for(per_round)
    if shares < per_round:
        raise ConfigError(
            f"secure_aggregation.num_shares={secure.num_shares}: a round of {per_round} "
            f"hospitals would share on a ring of {shares}; SecAgg+ here shares among every "
            "hospital of a round (leave num_shares null or at least the round's hospitals)")
    if threshold < per_round // 2 + 1:
        raise ConfigError(
            f"secure_aggregation.reconstruction_threshold={threshold}: a round of "
            f"{per_round} hospitals needs a majority, at least {per_round // 2 + 1}; below "
            "it a lying server could rebuild one hospital's masks, and every hospital "
            "refuses the round")


def secure_aggregation_grid(grid: Grid, settings: RunSettings, federation: Federation,
                            tracker: RunTracker) -> SecureAggregationGrid | None:
    """The Grid that runs secure aggregation under the strategy (None: mode none), after
    checking, before any training, that the round can release a sum and that every
    hospital holds the same CKKS key."""
    secure = settings.secure_aggregation
    if not secure.enabled:
        return None
    taking_part = [r for r in federation.reports if not r.declined]
    per_round = hospitals_per_round(settings, len(taking_part))
    threshold = secure.threshold_for(per_round)
    if per_round < threshold:
        raise ConfigError(
            f"secure_aggregation={secure.mode.value}: {per_round} hospital(s) per round "
            f"(of {len(taking_part)} taking part), fewer than the reconstruction threshold "
            f"{threshold}; a sum of fewer hospitals is never released")
    if secure.mode == SecureAggregationMode.secagg_plus:
        check_secagg_plus_graph(secure, per_round, threshold)
    public = check_ckks_keys(secure, taking_part) if secure.mode == SecureAggregationMode.ckks \
        else None
    # FedAvg's weight: the hospital's training records, or 1 under client-level DP and
    # distributed DP (whose shares add up: the strategy gets their plain sum).
    distributed = settings.privacy.mechanism == RecordLevelMechanism.distributed_dp
    max_weight = 1 if settings.privacy.central_dp.enabled or distributed else max(
        r.train_records for r in taking_part)
    hospital_of = {r.node_id: r.hospital for r in federation.reports}
    noise_threshold = federation.task.privacy.distributed_dp.threshold or 2 if distributed else 2
    threshold = max(threshold, noise_threshold)
    if per_round < threshold:
        raise ConfigError(
            f"privacy.distributed_dp: the noise shares assume sums of at least "
            f"{noise_threshold} hospitals; {per_round} hospital(s) per round (of "
            f"{len(taking_part)} taking part) cannot release one")
    log.info("secure aggregation: %s, threshold %d of %d hospitals per round",
             secure.mode.value, threshold, per_round)

    def aborted(server_round: int, reason: str) -> None:
        tracker.set_tags({f"secure_aggregation/round_{server_round}_released_nothing":
                          reason[:5000]})

    return SecureAggregationGrid(grid, secure, max_weight, public,
                                 lambda node: hospital_of.get(node, node),
                                 sum_updates=distributed, noise_threshold=noise_threshold,
                                 on_abort=aborted)


def check_ckks_keys(secure: SecureAggregationSettings,
                    reports: list[HospitalReport]) -> bytes:
    """The public CKKS context every hospital holds (and the operator's, when configured)."""
    public = reports[0].ckks_public
    if secure.ckks_public_context:
        path = Path(secure.ckks_public_context).expanduser()
        if not path.is_file():
            raise ckks.KeyMaterialError(
                f"secure_aggregation.ckks_public_context: {path} is not a file; it is the "
                f"{ckks.PUBLIC_FILE} written by deploy/ckks-keys.sh")
        public = ckks.public_bytes(ckks.load_public_context(path.read_bytes(),
                                                            f"the server ({path})"))
    expected = ckks.fingerprint(public) if public else "none"

    def key_of(report: HospitalReport) -> str:
        # From the bytes received, not the fingerprint the hospital says it has.
        return ckks.fingerprint(report.ckks_public) if report.ckks_public else "none"

    wrong = [f"hospital {r.hospital} (key {key_of(r)})" for r in reports
             if key_of(r) != expected]
    if wrong:
        raise ckks.KeyMaterialError(
            f"secure_aggregation=ckks: {', '.join(wrong)} hold other key material than "
            f"{'the operator' if secure.ckks_public_context else f'hospital {reports[0].hospital}'}"
            f" (key {expected}); give every hospital the same ckks-secret.ctx from "
            "deploy/ckks-keys.sh")
    return reports[0].ckks_public


@dataclass
class StrategyChain:
    """Flower's strategy in its wrappers, and the wrappers the server talks to."""

    strategy: Strategy  # the outermost
    gate: PrivacyBudgetGate
    check: UpdateCheck
    hospital_of: Callable[[int], int]  # node id -> hospital number
    client_level_privacy: ClientLevelPrivacy | None


def server_strategy(settings: RunSettings, federation: Federation, tracker: RunTracker,
                    train_rules: MetricRules, evaluate_rules: MetricRules,
                    head_keys: list[str] | None = None) -> StrategyChain:
    """Flower's strategy, wrapped: client-level DP (if configured), the budget gate (always:
    hospitals enforce their own budgets and policies; the gate stops sending work to one that
    refused or was dropped, and records why), the audit's update recorder, and the update
    checks (outermost: nothing else sees a reply that fails them)."""
    strategy = build_strategy(settings.strategy, train_rules, evaluate_rules)
    if settings.train.lr_schedule != LearningRateSchedule.constant:
        strategy = LearningRateScheduleStrategy(strategy, settings.train, settings.num_rounds)
    if settings.strategy.head_aggregation == HeadAggregation.class_counts:
        strategy = ClassWiseHead(strategy, head_keys or [], {
            r.node_id: r.label_counts for r in federation.reports
            if not r.declined and r.label_counts})
    client_level_privacy = None
    if settings.privacy.central_dp.enabled:
        strategy = with_client_level_dp(strategy, settings.privacy.central_dp,
                                        len(federation.reports))
        client_level_privacy = strategy.privacy_spent
    hospitals = {r.node_id: r.hospital for r in federation.reports}

    def hospital_of(node: int) -> int:
        return hospitals.get(node, node)

    gate = strategy = PrivacyBudgetGate(
        strategy, all_or_nothing=settings.privacy.central_dp.enabled,
        on_refusal=lambda node, why: tracker.record_refusal(hospital_of(node), why))
    for report in federation.reports:
        if report.declined:
            gate.exclude(report.node_id, report.declined)
    if settings.audit.updates_dir:  # clinical-fl-audit: what the server has of the audited
        # hospital: its updates, or under secure aggregation the rounds' aggregates
        strategy = UpdateRecorder(strategy, settings.audit.hospital,
                                  Path(settings.audit.updates_dir),
                                  audit_view(settings.secure_aggregation.enabled))
    check = UpdateCheck(strategy, settings.update_checks, hospital_of, gate.exclude,
                        summed=settings.secure_aggregation.enabled)
    return StrategyChain(check, gate, check, hospital_of, client_level_privacy)


def train_federation(strategy: Strategy, grid: Grid, initial: ArrayRecord,
                     settings: RunSettings, task_config: ConfigRecord,
                     round_end: RoundConsole, tracker: RunTracker, done: int = 0,
                     early_stopping: EarlyStopping | None = None) -> None:
    """Round 0 (the untrained adapter), then Flower's own loop; a spent budget, or a
    validation score that stopped improving (``early_stopping``), ends the run cleanly after
    the round. ``done``: the rounds a resumed run completed before (its adapter is
    ``initial``); Flower's loop runs the rest."""
    timeout = settings.strategy.round_timeout_s
    evaluate_fn = round_end
    if done:
        strategy = AfterRound(strategy, done)
        evaluate_fn = strategy.evaluate_fn(round_end)
    else:
        evaluate_before_training(strategy, grid, initial, task_config, timeout)
    if early_stopping is not None:
        evaluate_fn = early_stopping.stop_after(evaluate_fn)
    try:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.num_rounds - done,
                       timeout=timeout, train_config=task_config, evaluate_config=task_config,
                       evaluate_fn=evaluate_fn)
    except (TrainingStopped, PrivacyBudgetExhausted) as stop:
        reason = str(stop) or type(stop).__name__
        log.warning("training stopped early: %s", reason)
        tracker.set_tags({"stopped_early": reason[:5000]})
    if early_stopping is not None:  # the tag best_round, the metric best/<metric>
        early_stopping.record(tracker)


def save_final_adapter(model: PeftModel, arrays: ArrayRecord, task: TaskSettings,
                       labels: list[str], tracker: RunTracker) -> None:
    """The global adapter in PEFT's format, as an MLflow artifact and an MLflow Model."""
    load_trainable_state(model, arrays.to_torch_state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp), task.model, labels, task.data.deid)
        tracker.log_artifacts(Path(tmp), "adapter")
        # The same adapter as an MLflow Model: mlflow.pyfunc.load_model("runs:/<id>/model"),
        # registered when the run finishes (tracking.registered_model).
        tracker.model_logged(log_note_model(Path(tmp), labels))

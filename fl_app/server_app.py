"""ServerApp: the coordinator's side of a federated run, from configuration to saved adapter.

Order matters: everything that can be wrong with the configuration, the model
or a hospital's data is found before the first round trains anything.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fl_app.client_app import TASK_KEY
from fl_app.config import (
    compose_config,
    parse_overrides,
    task_settings,
    task_settings_to_yaml,
    to_run_settings,
)
from fl_app.paths import project_root
from fl_app.preflight import run_preflight
from strategies.metered_grid import MeteredGrid
from strategies.metric_rules import evaluate_metrics_rules, train_metrics_rules
from strategies.registry import build_strategy
from strategies.round_log import RoundLogger
from strategies.tracking import RunTracker
from tasks.central_evaluation import CentralEvaluator
from tasks.data import load_server_test_set, source_labels
from tasks.model import (
    build_model,
    load_tokenizer,
    load_trainable_state,
    save_adapter,
    trainable_state,
)

log = logging.getLogger(__name__)

app = ServerApp()


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = compose_config(parse_overrides(str(context.run_config.get("overrides", ""))))
    settings = to_run_settings(cfg)
    labels = source_labels(settings.data)
    task = task_settings(cfg, labels)
    # Building the model here fails fast on a bad model id, and gives the initial adapter.
    tokenizer = load_tokenizer(task.model)
    model = build_model(task.model, labels, task.seed, tokenizer)
    timeout = settings.strategy.round_timeout_s

    with RunTracker(settings.tracking, project_root()) as tracker:
        tracker.log_params(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        tracker.log_text(OmegaConf.to_yaml(cfg), "config/resolved_config.yaml")
        grid = MeteredGrid(grid)
        train_rules, evaluate_rules = train_metrics_rules(), evaluate_metrics_rules()
        strategy = build_strategy(settings.strategy, train_rules, evaluate_rules)
        test_set = load_server_test_set(settings.data, labels)
        central = None
        if test_set is not None:
            evaluator = CentralEvaluator(model, tokenizer, test_set, len(labels),
                                         task.model.max_length, task.train.eval_batch_size)
            central = lambda arrays: evaluator(arrays.to_torch_state_dict())  # noqa: E731
        round_logger = RoundLogger(tracker, grid, train_rules, evaluate_rules, central,
                                   settings.tracking.log_per_hospital)

        task_yaml = task_settings_to_yaml(task)
        reports = run_preflight(grid, ConfigRecord({TASK_KEY: task_yaml}),
                                settings.strategy.min_hospitals, timeout)
        tracker.log_params({f"hospital_{r.hospital}": {
            "train_records": r.train_records, "eval_records": r.eval_records,
            "label_counts": r.label_counts} for r in reports})
        tracker.set_tags({"hospitals": str(len(reports)), "labels": ",".join(labels)})

        initial = ArrayRecord(trainable_state(model))
        evaluate_before_training(strategy, grid, initial, ConfigRecord({TASK_KEY: task_yaml}),
                                 timeout)
        result = strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=settings.num_rounds, timeout=timeout,
            train_config=ConfigRecord({TASK_KEY: task_yaml}),
            evaluate_config=ConfigRecord({TASK_KEY: task_yaml}),
            evaluate_fn=round_logger)

        tracker.log_round_plot()
        if settings.tracking.save_adapter:
            # If no round aggregated anything, the global adapter is still the initial one.
            final = result.arrays if len(result.arrays) else initial
            load_trainable_state(model, final.to_torch_state_dict())
            with tempfile.TemporaryDirectory() as tmp:
                save_adapter(model, Path(tmp), task.model, labels)
                tracker.log_artifacts(Path(tmp), "adapter")

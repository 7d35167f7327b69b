"""Imbalanced label sets: class weights from the federation's label counts, the weighted loss
in both training paths, the hospital's checks on weights it receives, per-class recall and
F1, and the warning for a class never found (``pytest -k imbalance``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import ClassWeighting, OptimizerName, TrainSettings
from clinical_fl.tracking.per_class import per_class_metrics, safe_name, zero_recall
from fl_app.server.class_weights import (
    balanced_weights,
    federation_counts,
    noisy_balanced_weights,
    plan_class_weights,
)
from fl_app.server.run_summary import FinishedRun, summary
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.learning.batches import make_loader, tokenize
from tasks.learning.training import logit_scale_tensor, per_record_loss, train_locally
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.privacy.dp_sgd import train_with_dp_sgd
from tests.hospital_process import hospital_preflight_counts, hospital_train_reply, initial_arrays
from tests.support import task


def test_imbalance_balanced_weights_match_a_hand_computation():
    # 10 records in 3 classes that have any: N / (K x n_c); a class nobody holds weighs 1
    assert balanced_weights([6, 3, 1, 0]) == pytest.approx([10 / 18, 10 / 9, 10 / 3, 1.0])
    weights = balanced_weights([500, 40, 60])
    counts = [500, 40, 60]
    # a record's mean weight stays 1: the loss keeps its scale
    assert sum(w * c for w, c in zip(weights, counts, strict=True)) / sum(counts) \
        == pytest.approx(1.0)
    assert federation_counts([[5, 1, 0], [1, 2, 3]], 3) == [6, 3, 3]
    assert federation_counts([[5, 1, 0], []], 3) is None, "one hospital withheld its counts"
    assert federation_counts([[5, 1]], 3) is None, "a list of the wrong length"


def test_imbalance_the_server_weighs_classes_only_from_every_hospitals_counts(tiny_bert):
    settings = task(tiny_bert, labels=["a", "b", "c"])
    assert settings.train.class_weighting == ClassWeighting.balanced  # the default
    assert plan_class_weights(settings, [[8, 1, 1], [2, 3, 5]]) == "balanced"
    assert settings.train.class_weights == pytest.approx(balanced_weights([10, 4, 6]))
    withheld = task(tiny_bert, labels=["a", "b", "c"])
    assert plan_class_weights(withheld, [[8, 1, 1], []]) == "unweighted: label counts withheld"
    assert withheld.train.class_weights is None
    off = task(tiny_bert, "train.class_weighting=none", labels=["a", "b", "c"])
    assert plan_class_weights(off, [[8, 1, 1]]) == "none" and off.train.class_weights is None
    given = task(tiny_bert, "train.class_weights=[1,2,3]", labels=["a", "b", "c"])
    assert plan_class_weights(given, [[8, 1, 1]]) == "given"
    assert given.train.class_weights == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("overrides,expected", [
    (("train.class_weighting=none", "train.class_weights=[1,1,1,1,1,1]"), "switched-off"),
    (("train.class_weights=[1,2]",), "one weight per label"),
    (("train.class_weights=[1,1,1,1,1,nan]",), "finite weights"),
    (("train.class_weights=[1,1,1,1,1,0]",), "finite weights"),
    (("train.class_weights=[1,1,1,1,1,1e9]",), "finite weights"),
    (("privacy=dp_sgd", "privacy.dp_sgd.grad_sample_mode=ghost", "model.long_notes=truncate",
      "train.class_weights=[1,1,1,1,1,1]"), "ghost"),
])
def test_imbalance_weights_a_run_could_not_use_are_refused(tiny_bert, overrides, expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        task(tiny_bert, *overrides)
    assert refused.value.key == "train.class_weights"


def test_imbalance_a_hospital_refuses_weights_that_do_not_fit_its_labels(tiny_bert,
                                                                          tmp_path):
    """A hostile or mistaken server sends two weights for six labels: the hospital's own
    check refuses before any step, naming the key."""
    settings = task(tiny_bert)
    yaml = task_settings_to_yaml(settings).replace(
        "class_weights: null", "class_weights:\n  - 1.0\n  - 50.0")
    assert "class_weights:\n  - 1.0" in yaml
    reply, _ = hospital_train_reply(yaml, tmp_path / "state", run_id=1, server_round=1,
                                    arrays=initial_arrays(task_settings_to_yaml(settings)))
    assert reply["error"].startswith("4001 ") and "key=train.class_weights" in reply["error"]


def test_imbalance_the_weighted_loss_weighs_each_record_by_its_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    plain = per_record_loss(logits, labels, None)
    weighted = per_record_loss(logits, labels, torch.tensor([0.5, 3.0]))
    assert torch.allclose(weighted, plain * torch.tensor([0.5, 3.0, 3.0]))
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, labels,
                                                                   reduction="none"))


@pytest.fixture(scope="module")
def still_model(tiny_bert):
    """A tiny model without dropout, and its records: two passes see the same forward."""
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=64)
    tokenizer = load_tokenizer(settings)
    model = build_model(settings, list(SPECIALTIES), 0, tokenizer)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = load_hospital_data(DataSettings(notes_per_hospital=40), list(SPECIALTIES), 0, 2)
    return model, tokenizer, tokenize(data.train, tokenizer, 64), trainable_state(model)


@pytest.mark.parametrize("path", ["plain", "dp_sgd"])
def test_imbalance_both_training_paths_weigh_each_record_by_its_class(still_model, path):
    """Every class weighing 2: the training loss doubles (steps too small to move the model),
    in plain training and in DP-SGD's per-record losses."""
    model, tokenizer, records, start = still_model

    def loss(weights: list[float] | None) -> float:
        load_trainable_state(model, start)
        settings = TrainSettings(learning_rate=1e-12, head_learning_rate=None,
                                 max_grad_norm=0.0, class_weights=weights)
        loader = make_loader(records, tokenizer, 8, shuffle=False)
        if path == "plain":
            return train_locally(model, loader, settings).loss
        return train_with_dp_sgd(model, loader, settings, noise_multiplier=0.0,
                                 max_grad_norm=1e6, grad_sample_mode=GradSampleMode.hooks,
                                 history=[], poisson_sampling=False, noise_seed=0).loss

    assert loss([2.0] * len(SPECIALTIES)) == pytest.approx(2 * loss(None), rel=1e-4)


def test_imbalance_per_class_recall_and_f1_from_counts():
    metrics = per_class_metrics("federated", ["cardiology", "neuro/spine", "rare"],
                                tp=[8, 3, 0], fp=[2, 1, 0], fn=[0, 1, 4])
    assert metrics["federated/recall/cardiology"] == 1.0
    assert metrics["federated/f1/cardiology"] == pytest.approx(16 / 18)
    assert metrics["federated/recall/neuro_spine"] == 0.75  # MLflow-safe name
    assert metrics["federated/recall/rare"] == 0.0 and metrics["federated/f1/rare"] == 0.0
    assert zero_recall(metrics, "federated") == ["rare"]
    no_support = per_class_metrics("central", ["a"], tp=[0], fp=[3], fn=[0])
    assert no_support == {}, "a class without notes has no recall"
    assert safe_name("") == "_" and safe_name("C04 Neoplasms") == "C04 Neoplasms"


def test_imbalance_the_run_summary_warns_of_a_class_never_found():
    history = {4: {"federated/accuracy": 0.8, "federated/recall/rare": 0.0,
                   "federated/recall/common": 0.9, "central/accuracy": 0.7,
                   "central/recall/rare": 0.25}}
    text = summary(FinishedRun(run_id="r", run_name="n", experiment="e",
                               tracking_uri="sqlite:////x.db", num_rounds=4, history=history,
                               adapter_logged=False), Path("/x"))
    assert "WARNING    federated: 1 class(es) never found in round 4 (recall 0): rare" in text
    assert "central: " not in text
    assert not math.isnan(history[4]["federated/accuracy"])


# -- noisy label counts under DP-SGD (tasks/privacy/label_counts.py) ---------------------------

def test_imbalance_weights_from_noisy_counts_match_a_hand_computation(tiny_bert):
    # Summed noisy counts of 4 hospitals at sigma 2: each sum floored at 2 x sqrt(4) = 4, and
    # every label counts in K (noise hides which are absent): N = 30 + 4 + 4 + 8 = 46.
    assert noisy_balanced_weights([30, 0, 2, 8], noise=2.0, hospitals=4) == pytest.approx(
        [46 / 120, 46 / 16, 46 / 16, 46 / 32])
    # A small noise still floors at 1 record.
    assert noisy_balanced_weights([9, 0], noise=0.1, hospitals=1) == pytest.approx(
        [10 / 18, 10 / 2])
    settings = task(tiny_bert, "privacy=dp_sgd", "privacy.dp_sgd.label_count_noise=2",
                    labels=["a", "b", "c"])
    assert plan_class_weights(settings, [[8, 0, 1], [2, 3, 1]]) == "balanced: noisy counts"
    # Sums 10, 3, 2; floor 2 x sqrt(2) = 2.83: 10, 3, 2.83 (N = 15.83).
    floor = 2 * math.sqrt(2)
    total = 10 + 3 + floor
    assert settings.train.class_weights == pytest.approx(
        [total / 30, total / 9, total / (3 * floor)])


@pytest.mark.parametrize("overrides,expected", [
    (("privacy.dp_sgd.label_count_noise=5",), "privacy=dp_sgd"),  # DP-SGD off
    (("privacy=dp_sgd", "privacy.dp_sgd.label_count_noise=5", "train.class_weighting=none"),
     "class_weighting=none"),
    (("privacy=dp_sgd", "privacy.dp_sgd.label_count_noise=0"), "standard deviation"),
    (("privacy=dp_sgd", "privacy.dp_sgd.label_count_noise=nan"), "standard deviation"),
    (("privacy=dp_sgd", "privacy.dp_sgd.label_count_noise=-1"), "standard deviation"),
])
def test_imbalance_noisy_counts_a_run_could_not_use_are_refused(tiny_bert, overrides,
                                                                 expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        task(tiny_bert, *overrides)
    assert refused.value.key == "privacy.dp_sgd.label_count_noise"


def test_imbalance_noisy_counts_with_given_weights_are_refused_before_the_run():
    from clinical_fl.settings.compose import compose_config, to_run_settings

    with pytest.raises(ConfigError, match="would not be used") as refused:
        to_run_settings(compose_config(["privacy=dp_sgd", "privacy.dp_sgd.label_count_noise=5",
                                        "train.class_weights=[1,1,1,1,1,1]"]))
    assert refused.value.key == "privacy.dp_sgd.label_count_noise"


def test_imbalance_a_private_hospital_releases_noisy_counts_once_and_books_them(tiny_bert,
                                                                               tmp_path):
    """Through the real handlers: the noisy counts leave only after the release is in the
    ledger as (sigma, 1.0, 1); a second preflight of the run sends the same counts and books
    nothing more; the first round's noise is calibrated so that release and training together
    stay within the target, and the epsilon reported is Opacus' own over that history (under
    accountant=rdp; PLD, the default, is checked against dp-accounting in
    tests/test_accounting_pld.py)."""
    import json

    from opacus.accountants import RDPAccountant

    from clinical_fl.settings.privacy import Accountant
    from tasks.privacy.accounting import calibrate_noise_multiplier

    sigma, target = 4.0, 3.0
    settings = task(tiny_bert, "privacy=dp_sgd", f"privacy.dp_sgd.target_epsilon={target}",
                    f"privacy.dp_sgd.label_count_noise={sigma}", "data.notes_per_hospital=40",
                    "train.batch_size=8", "privacy.dp_sgd.accountant=rdp", planned_rounds=2)
    yaml = task_settings_to_yaml(settings)
    status, counts = hospital_preflight_counts(yaml, tmp_path, 5)
    assert status["ok"] and not status["declined"], status
    assert len(counts) == len(SPECIALTIES) and all(isinstance(c, int) and c >= 0
                                                   for c in counts)

    def ledger_run() -> dict:
        return json.loads((tmp_path / "privacy-ledger.json").read_text())["runs"][0]

    booked = ledger_run()
    assert booked["history"] == [[sigma, 1.0, 1]] and booked["released_label_counts"] == counts
    again, counts_again = hospital_preflight_counts(yaml, tmp_path, 5)
    assert again["ok"] and counts_again == counts and ledger_run()["history"] == [[sigma, 1.0, 1]]
    exact = load_hospital_data(settings.data, settings.data.labels, 0, 2).train
    exact_counts = [list(exact["label"]).count(i) for i in range(len(SPECIALTIES))]
    assert counts != exact_counts, "noise was added (all six equal by chance: p < 1e-4)"

    reply, _ = hospital_train_reply(yaml, tmp_path, run_id=5, server_round=1,
                                    arrays=initial_arrays(yaml))
    assert "error" not in reply, reply
    run = ledger_run()
    assert run["history"][0] == [sigma, 1.0, 1] and len(run["history"]) == 2
    noise, rate, steps = run["history"][1]
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1), (noise, rate, steps)]
    # Opacus' accountant on the product's orders (integers 2-256) gives the same epsilon; on
    # its own finer orders slightly less: the product never claims less than Opacus.
    orders = list(range(2, 257))
    assert reply["epsilon"] == pytest.approx(
        accountant.get_epsilon(run["delta"], alphas=orders), rel=1e-6)
    assert reply["epsilon"] >= accountant.get_epsilon(run["delta"])
    # Two planned rounds: the calibration left room for the release and both rounds.
    both = RDPAccountant()
    both.history = [(sigma, 1.0, 1), (noise, rate, 2 * steps)]
    assert both.get_epsilon(run["delta"], alphas=orders) <= target
    without = calibrate_noise_multiplier(target, run["delta"], rate, 2 * steps, Accountant.rdp)
    assert noise > without, "the release costs budget: more noise than without it"


def test_imbalance_without_label_count_noise_a_private_hospital_sends_no_counts(tiny_bert,
                                                                               tmp_path):
    settings = task(tiny_bert, "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=3",
                    "data.notes_per_hospital=40", "train.batch_size=8")
    status, counts = hospital_preflight_counts(task_settings_to_yaml(settings), tmp_path, 5)
    assert status["ok"] and counts is None
    assert not (tmp_path / "privacy-ledger.json").exists() or all(
        not run["history"] for run in __import__("json").loads(
            (tmp_path / "privacy-ledger.json").read_text())["runs"])


# -- restricted softmax: train.absent_class_scale ---------------------------------------------

def test_imbalance_restricted_softmax_scales_only_the_absent_classes_logits():
    logits = torch.tensor([[2.0, 1.0, 3.0], [0.5, -1.0, 4.0]])
    labels = torch.tensor([0, 1])
    scale = logit_scale_tensor(0.5, [True, True, False], "cpu")
    assert scale.tolist() == [1.0, 1.0, 0.5]
    expected = torch.nn.functional.cross_entropy(
        torch.tensor([[2.0, 1.0, 1.5], [0.5, -1.0, 2.0]]), labels, reduction="none")
    assert torch.allclose(per_record_loss(logits, labels, None, scale), expected)
    assert logit_scale_tensor(0.5, [True] * 3, "cpu") is None
    assert logit_scale_tensor(1.0, [True, False, False], "cpu") is None


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_imbalance_restricted_softmax_leaves_the_absent_classes_head_rows_alone(still_model,
                                                                                 scale):
    """At scale 0 a hospital's training never moves the head's rows of classes it holds no
    record of (plain SGD, no weight decay); at 1 (the full softmax) it pushes them down."""
    model, tokenizer, records, start = still_model
    held = sorted(set(records["labels"]))[:2]
    mine = records.filter(lambda r: r["labels"] in held)
    load_trainable_state(model, start)
    settings = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=0.5,
                             head_learning_rate=None, weight_decay=0.0, max_grad_norm=0.0)
    train_locally(model, make_loader(mine, tokenizer, 8, shuffle=False), settings,
                  classes_held=[c in held for c in range(len(SPECIALTIES))],
                  absent_class_scale=scale)
    head = [k for k in start if "modules_to_save" in k and k.endswith("classifier.modules_to_save"
                                                                           ".default.weight")]
    assert len(head) == 1, list(start)
    moved = (trainable_state(model)[head[0]] - start[head[0]]).abs().sum(dim=1)
    absent = [c for c in range(len(SPECIALTIES)) if c not in held]
    assert all(moved[c] > 0 for c in held)
    if scale == 0.0:
        assert all(moved[c] == 0 for c in absent), moved
    else:
        assert all(moved[c] > 0 for c in absent), moved


@pytest.mark.parametrize("overrides,expected", [
    (("privacy=dp_sgd", "train.absent_class_scale=0.5"), "record-level DP"),
    (("train.absent_class_scale=1.5",), r"\[0, 1\]"),
    (("train.absent_class_scale=nan",), r"\[0, 1\]"),
    (("train.absent_class_scale=-0.1",), r"\[0, 1\]"),
])
def test_imbalance_restricted_softmax_values_a_run_could_not_use_are_refused(tiny_bert,
                                                                            overrides, expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        task(tiny_bert, *overrides)
    assert refused.value.key == "train.absent_class_scale"


def test_imbalance_restricted_softmax_is_on_by_default_only_without_record_level_dp(tiny_bert):
    assert task(tiny_bert).restricted_softmax_scale() == 0.5
    assert task(tiny_bert, "privacy=dp_sgd").restricted_softmax_scale() == 1.0
    assert task(tiny_bert, "privacy=distributed_dp", "secure_aggregation=secagg_plus",
                "strategy.min_hospitals=3").restricted_softmax_scale() == 1.0
    # A privacy sweep's non-private level trains as its private levels do.
    assert task(tiny_bert, "+sweep=epsilon", "privacy.dp_sgd.target_epsilon=inf"
                ).restricted_softmax_scale() == 1.0
    assert task(tiny_bert, "train.absent_class_scale=0").restricted_softmax_scale() == 0.0
    # A setting left null stays null in what the hospitals receive: each resolves it itself.
    assert task(tiny_bert).train.absent_class_scale is None

"""Imbalanced label sets: class weights from the federation's label counts, the weighted loss
in both training paths, the hospital's checks on weights it receives, per-class recall and
F1, and the warning for a class never found (``pytest -k imbalance``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fl_app.class_weights import balanced_weights, federation_counts, plan_class_weights
from fl_app.run_summary import FinishedRun, summary
from settings.checks import ConfigError
from settings.compose import task_settings_to_yaml
from settings.task import (
    ClassWeighting,
    DataSettings,
    GradSampleMode,
    ModelSettings,
    TrainSettings,
)
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.learning.batches import make_loader, tokenize
from tasks.learning.training import per_record_loss, train_locally
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.privacy.dp_sgd import train_with_dp_sgd
from tests.hospital_process import hospital_train_reply, initial_arrays
from tests.support import task
from tracking.per_class import per_class_metrics, safe_name, zero_recall


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

import torch

from clinical_fl.settings.strategy import StrategyName, StrategySettings
from strategies.metric_rules import evaluate_metrics_rules, train_metrics_rules
from strategies.registry import build_strategy
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tests.support import task


def _hospital(tiny_bert, **train):
    settings = task(tiny_bert, "model.max_length=128", "data.notes_per_hospital=120",
                    "train.learning_rate=1e-2", "train.head_learning_rate=null",
                    *[f"train.{key}={value}" for key, value in train.items()])
    return Hospital(settings, list(SPECIALTIES), 0, 2)


def test_local_training_lowers_the_loss_and_improves_accuracy(tiny_bert):
    hospital = _hospital(tiny_bert, local_epochs=2)
    start = trainable_state(hospital.model)
    before = hospital.evaluate(start)
    state, outcome = hospital.train(start, server_round=1)
    after = hospital.evaluate(state)
    assert outcome.num_examples == len(hospital.data.train) and outcome.num_steps > 0
    assert after.loss < 0.9 * before.loss
    assert after.accuracy > 1 / 6 + 0.15, "well above the 6-class chance level"


def test_fedprox_term_keeps_the_update_closer_to_the_global_adapter(tiny_bert):
    hospital = _hospital(tiny_bert)
    start = trainable_state(hospital.model)

    def drift(mu):
        state, _ = hospital.train(start, server_round=1, proximal_mu=mu)
        return sum((state[k] - start[k]).pow(2).sum() for k in start).item()

    assert drift(100.0) < drift(0.0)


def test_same_round_same_update(tiny_bert):
    hospital = _hospital(tiny_bert)
    start = trainable_state(hospital.model)
    a, _ = hospital.train(start, server_round=3)
    b, _ = hospital.train(start, server_round=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_configured_strategy_is_flowers_own_class():
    import flwr.serverapp.strategy as flower

    for name in StrategyName:
        strategy = build_strategy(StrategySettings(name=name, min_hospitals=3),
                                  train_metrics_rules(), evaluate_metrics_rules())
        assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
        assert isinstance(strategy, flower.Strategy)
        assert strategy.min_available_nodes == 3

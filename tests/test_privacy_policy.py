"""A hospital's own privacy policy: read from its state directory and node config, stricter
wins, bad values named, and the real ClientApp handlers refuse what it rules out before any
step (simulation and deployment runs of the same refusals: test_e2e_privacy.py,
test_deployment.py)."""

from __future__ import annotations

import math
import re

import pytest

from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.privacy import DpSgdSettings, RecordLevelMechanism
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.privacy.policy import (
    POLICY_FILE,
    EvalRelease,
    HospitalPolicy,
    PolicyError,
    load_policy,
    parse_policy,
)
from tests.hospital_process import hospital_evaluate, hospital_preflight, hospital_train
from tests.support import task as compose_task

# -- reading the policy ------------------------------------------------------------------------


def test_policy_file_and_node_config_combine_to_the_stricter(tmp_path):
    (tmp_path / POLICY_FILE).write_text('max-epsilon = 5.0\nmax-delta = 1e-6\n'
                                        'eval-metrics = "full"\n'
                                        'distributed-dp-noise-floor = 0.8\n')
    policy = load_policy(tmp_path, {"max-epsilon": 3.0, "max-delta": 1e-5,
                                    "eval-metrics": "aggregate", "partition-id": 0,
                                    "distributed-dp-noise-floor": 0.5}, 4)
    assert policy.max_epsilon == 3.0 and policy.max_delta == 1e-6
    assert policy.distributed_dp_noise_floor == 0.8  # more of its own noise is stricter
    assert policy.eval_metrics == EvalRelease.aggregate
    assert policy.require_dp, "a budget implies DP"
    assert str(tmp_path / POLICY_FILE) in policy.source and "node config" in policy.source


def test_no_policy_means_no_limits_and_the_default_delta():
    policy = load_policy(__import__("pathlib").Path("/nonexistent"), {"partition-id": 1}, 1)
    assert policy.max_epsilon is None and not policy.require_dp
    assert policy.delta(240) == 1e-5 and policy.delta(50_000) == 2e-6
    assert policy.eval_release(dp_sgd=True) == EvalRelease.aggregate
    assert policy.eval_release(dp_sgd=False) == EvalRelease.full


@pytest.mark.parametrize("values,message", [
    ({"max-epsilon": "lots"}, r"hospital 2: privacy policy \(test\): key 'max-epsilon' must "
                              r"be a number, got 'lots'"),
    ({"max-epsilon": -1}, r"key 'max-epsilon' must be a finite number > 0, got -1"),
    ({"max-epsilon": math.inf}, r"key 'max-epsilon' must be a finite number > 0"),
    ({"max-delta": 1.5}, r"key 'max-delta' must be below 1, got 1.5"),
    ({"require-dp": "yes"}, r"key 'require-dp' must be true or false, got 'yes'"),
    ({"require-dp": False, "max-epsilon": 3}, r"'require-dp' is false but max-epsilon is set"),
    ({"eval-metrics": "some"}, r"key 'eval-metrics' must be one of \['full', 'aggregate', "
                               r"'none'\], got 'some'"),
    ({"distributed-dp-noise-floor": 0}, r"key 'distributed-dp-noise-floor' must be a finite "
                                        r"number > 0, got 0"),
    ({"max-epsilom": 3}, r"unknown key\(s\) \['max-epsilom'\]"),
    ({"max-epsilon": True}, r"key 'max-epsilon' must be a number, got True"),
])
def test_bad_policy_values_are_named(values, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(values, 2, "test")


def test_a_policy_file_that_is_not_toml_is_named(tmp_path):
    (tmp_path / POLICY_FILE).write_text("max-epsilon = = 3")
    with pytest.raises(PolicyError, match=rf"hospital 0: privacy policy .*{POLICY_FILE} is "
                                          "not valid TOML"):
        load_policy(tmp_path, {}, 0)


def test_a_max_delta_at_or_above_one_over_records_is_an_error():
    policy = HospitalPolicy(hospital=3, max_delta=0.01, source="node config")
    with pytest.raises(PolicyError, match=r"hospital 3: privacy policy \(node config\) key "
                                          r"'max-delta' is 0.01, not below 1/records = 1/120"):
        policy.check_records(120)
    with pytest.raises(PolicyError, match="1/records = 1/100"):
        policy.check_records(100)  # exactly 1/records
    policy.check_records(50)  # 0.01 is below 1/50



# -- refusals by the real ClientApp handlers ---------------------------------------------------


@pytest.fixture(scope="module")
def task(tiny_bert):
    def make(**dp) -> str:
        settings = compose_task(tiny_bert, "data.notes_per_hospital=40", "train.batch_size=8",
                                planned_rounds=2)
        if dp:
            settings.privacy.dp_sgd = DpSgdSettings(**dp)
            settings.privacy.mechanism = RecordLevelMechanism.dp_sgd
        return task_settings_to_yaml(settings)
    return make


def _no_ledger_spent(state_dir):
    import json

    ledger = state_dir / "privacy-ledger.json"
    return not ledger.exists() or all(
        not run["history"] for run in json.loads(ledger.read_text())["runs"])


@pytest.mark.parametrize("where", ["node config", "policy file"])
@pytest.mark.parametrize("case,dp,key,message", [
    ("privacy=none", {}, "require-dp",
     "require-dp .*training with no DP-SGD; refused, nothing trained"),
    ("target_epsilon=.inf", {"target_epsilon": math.inf}, "require-dp",
     r"require-dp .*no DP-SGD \(privacy.dp_sgd.target_epsilon=\.inf.*; refused"),
    ("delta above max-delta", {"target_epsilon": 3.0, "target_delta": 1e-3}, "max-delta",
     r"max-delta .*target_delta=0.001, above the hospital's maximum 1e-05"),
    ("noise overruns the lifetime budget", {"noise_multiplier": 0.3, "target_epsilon": None},
     "max-epsilon", r"max-epsilon .*above the hospital's lifetime budget 2"),
])
def test_policy_refuses_before_any_step(task, tmp_path, where, case, dp, key, message):
    """The server learns the refusal's code and the policy key; the hospital's own log keeps
    the reason in words."""
    policy = {"max-epsilon": 2.0, "max-delta": 1e-5}
    node_config = policy if where == "node config" else {}
    if where == "policy file":
        (tmp_path / POLICY_FILE).write_text(
            'max-epsilon = 2.0\nmax-delta = 1e-5\ndeid = "allowed"\n')
    settings = task(**dp)
    status = hospital_preflight(settings, tmp_path, 5, node_config)
    assert status["ok"], status["problem"]
    assert status["declined"] == f"4007 policy-refused key={key}", status
    reply = hospital_train(settings, tmp_path, 5, 1, node_config)
    assert reply == {"code": 4007, "error": f"4007 policy-refused key={key}"}, reply
    local = (tmp_path / "hospital.log").read_text()
    assert len(re.findall(message, local)) == 2, local  # preflight and train, in words
    assert _no_ledger_spent(tmp_path), "nothing trained"


def test_a_policy_within_limits_trains_and_reports_its_lifetime(task, tmp_path):
    reply = hospital_train(task(target_epsilon=3.0), tmp_path, 5, 1,
                           {"max-epsilon": 6.0, "max-delta": 1e-5})
    assert "error" not in reply, reply
    assert 0 < reply["epsilon"] <= 3.0 and reply["lifetime-epsilon"] == pytest.approx(
        reply["epsilon"]), "one run: lifetime = run"
    assert reply["lifetime-delta"] == 1e-5


def test_a_bad_policy_stops_preflight_naming_the_hospital_and_key(task, tmp_path):
    status = hospital_preflight(task(target_epsilon=3.0), tmp_path, 5, {"max-delta": 0.5})
    assert not status["ok"]
    assert status["problem"] == "4008 policy-invalid key=max-delta"
    assert "hospital 0: privacy policy (node config) key 'max-delta' is 0.5, not below " \
           "1/records" in (tmp_path / "hospital.log").read_text()


def test_under_dp_sgd_replies_carry_no_timing_and_no_per_class_counts(task, tmp_path):
    train = hospital_train(task(target_epsilon=3.0), tmp_path, 5, 1)
    assert "train-seconds" not in train and "train-loss" not in train
    evaluation = hospital_evaluate(task(target_epsilon=3.0), tmp_path, 5)
    assert all(math.isfinite(evaluation[k]) for k in ("accuracy", "eval-loss", "macro-f1"))
    counts = ("true-positives", "false-positives", "false-negatives")
    assert all(evaluation[k] == [] for k in counts), "per-class counts withheld"
    full = hospital_evaluate(task(target_epsilon=3.0), tmp_path, 5, {"eval-metrics": "full"})
    assert len(full["true-positives"]) == len(SPECIALTIES)
    assert set(full) == set(evaluation), "Flower aggregates only replies with the same keys"
    none = hospital_evaluate(task(target_epsilon=3.0), tmp_path, 5, {"eval-metrics": "none"})
    assert all(math.isnan(none[k]) for k in ("accuracy", "eval-loss", "macro-f1"))
    assert none["num-examples"] == full["num-examples"] > 0
    plain = hospital_train(task(), tmp_path, 5, 1)
    assert "train-seconds" in plain, "non-private runs keep their timing"


@pytest.mark.parametrize("typo,meant", [("max_epsilon", "max-epsilon"),
                                        ("require_dp", "require-dp"),
                                        ("Max-Epsilon", "max-epsilon"),
                                        ("max-epsilom", "max-epsilon"),
                                        ("label_column", "label-column"),
                                        ("eval_fraction", "eval-fraction")])
def test_hostile_server_cannot_exploit_a_policy_typo_in_the_node_config(task, tmp_path, typo,
                                                                         meant):
    """A node config key that is a policy key spelled another way would leave the hospital
    without that limit (the TOML file already refuses unknown keys): it stops the hospital,
    naming the key it meant."""
    status = hospital_preflight(task(), tmp_path, 5, {typo: "3"})
    assert not status["ok"] and status["problem"] == f"4008 policy-invalid key={meant}"
    reply = hospital_train(task(), tmp_path, 5, 1, {typo: "3"})
    assert reply == {"code": 4008, "error": f"4008 policy-invalid key={meant}"}
    assert _no_ledger_spent(tmp_path)
    # Flower's own node config keys and the hospital's other keys are not typos.
    load_policy(tmp_path, {"partition-id": 0, "num-partitions": 2, "state-dir": "x",
                           "ckks-context": "y", "fault-drill": "nan"}, 0)

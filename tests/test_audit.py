"""The one-run privacy audit: its bound is the paper's, its canaries reach the update the
server sees, and ``clinical-fl-audit`` runs end to end on the product's own federated code."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from clinical_fl.protocol import messages as m
from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.privacy import DpSgdSettings, RecordLevelMechanism
from fl_app.commands.audit import AUDITORS, audit_bounds
from fl_app.server.grids.secure_aggregation import SecureAggregationGrid
from fl_app.server.preflight import run_preflight
from strategies.update_recorder import SECURE_SUM, UpdateRecorder
from tasks.audit.bound import epsilon_lower_bound, guess_and_bound, p_value
from tasks.audit.canaries import GRADIENT, NOTE, make_canaries, write_canaries
from tasks.audit.scores import white_box_scores
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tasks.privacy.ledger import PrivacyLedger
from tests.flower_processes import ROOT
from tests.support import NO_DEID, mlflow_client, task
from tests.test_distributed_dp import ClientAppGrid


def _paper_p_value(m, r, v, eps, delta):
    """The paper's bound written out with exact binomial sums (math.comb), independently."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def at_least(k):
        return sum(math.comb(r, i) * q ** i * (1 - q) ** (r - i) for i in range(max(k, 0), r + 1))

    worst = max(((at_least(v - i) - at_least(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, at_least(v) + 2 * m * delta * worst)


def test_audit_bound_all_guesses_right_without_delta_is_the_closed_form():
    # Every guess right, delta 0: P[Bin(r, q) = r] = q^r = alpha  =>  eps = ln(q / (1 - q)).
    for r in (20, 100, 400):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)),
                                                                     abs=1e-5)


@pytest.mark.parametrize("m,r,v,delta", [(100, 40, 34, 1e-3), (1000, 200, 150, 1e-5),
                                         (50, 10, 10, 1e-2)])
def test_audit_bound_arithmetic_matches_the_papers_formula(m, r, v, delta):
    for eps in (0.0, 0.5, 1.3, 3.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(
            _paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)
    bound = epsilon_lower_bound(m, r, v, delta)
    if bound > 0:  # the largest epsilon still rejected at 95%
        assert _paper_p_value(m, r, v, bound, delta) < 0.05
        assert _paper_p_value(m, r, v, bound + 1e-4, delta) >= 0.05
    assert epsilon_lower_bound(m, r, v, delta) <= epsilon_lower_bound(m, r, v, 0.0)


def test_audit_guesses_take_the_most_and_least_confident():
    scores = [0.1, 0.9, 0.2, 0.8, 0.5, 0.6]
    included = [False, True, False, True, True, False]
    best, tried = guess_and_bound(scores, included, [1, 2], delta=0.0)
    assert [(t.guesses, t.correct) for t in tried] == [(2, 2), (4, 4)]
    assert best.epsilon_lower_bound == max(t.epsilon_lower_bound for t in tried)
    assert guess_and_bound([0.0] * 6, included, [3], 0.0)[0].correct <= 6


def test_the_black_and_white_box_bounds_hold_together_at_the_confidence_asked():
    """The report's two bounds are read together (its headline is the larger), so each is
    computed at 1 - (1 - confidence) / 2, and within each at a further 1/k of that."""
    m = 200
    scores = [float(j) for j in range(m)]
    included = [j >= m // 2 for j in range(m)]  # perfectly separated: every guess right
    both = audit_bounds({a: scores for a in AUDITORS}, {a: included for a in AUDITORS},
                        [50], 1e-5, 0.95)
    assert set(AUDITORS) == {"white_box", "black_box"}
    for mode in AUDITORS:
        assert both[mode]["confidence"] == pytest.approx(0.975)
        assert (both[mode]["guesses"], both[mode]["correct"]) == (100, 100)
        assert both[mode]["epsilon_lower_bound"] == epsilon_lower_bound(m, 100, 100, 1e-5,
                                                                        0.975)
        assert both[mode]["epsilon_lower_bound"] < epsilon_lower_bound(m, 100, 100, 1e-5, 0.95)
    # Two k values: Bonferroni over the auditors, then over the k (alpha / 4 each).
    two_k = audit_bounds({a: scores for a in AUDITORS}, {a: included for a in AUDITORS},
                         [25, 50], 1e-5, 0.9)
    assert [t["epsilon_lower_bound"] for t in two_k["white_box"]["tried"]] == [
        epsilon_lower_bound(m, r, r, 1e-5, 1 - 0.1 / 4) for r in (50, 100)]


@pytest.fixture(scope="module")
def canary_hospital(tiny_bert, tmp_path_factory):
    work = tmp_path_factory.mktemp("audit")
    canaries = make_canaries(12, len(SPECIALTIES))
    given = write_canaries([c for c in canaries if c.included], work / "given.jsonl")
    # Canaries of norm 10 (audit.canary_norm; the private case clips at 10 too): in a model
    # this small (4k trainable parameters) real gradients project on a random direction with
    # ~1/sqrt(4k) of their norm, enough to blur canaries of norm 1 in one short round.
    settings = task(tiny_bert, "model.max_length=32", "data.notes_per_hospital=40",
                    "train.batch_size=8", "train.local_epochs=3", "train.optimizer=sgd",
                    "train.learning_rate=0.1", "train.head_learning_rate=null",
                    f"audit.canaries_path={given}", "audit.canary_norm=10")
    return settings, canaries, work


@pytest.mark.parametrize("private", [False, True])
def test_audit_gradient_canaries_reach_the_update_the_server_sees(canary_hospital, private):
    """Without noise, an included gradient canary moves the update along minus its secret
    direction; an excluded one does not."""
    settings, canaries, work = canary_hospital
    if private:  # DP-SGD with (almost) no noise: clipping keeps the canary's norm
        settings.privacy.dp_sgd = DpSgdSettings(noise_multiplier=1e-9, max_grad_norm=10.0)
        settings.privacy.mechanism = RecordLevelMechanism.dp_sgd
    hospital = Hospital(settings, list(SPECIALTIES), 0, 2)
    gradients = [c for c in canaries if c.kind == GRADIENT]
    assert len(hospital.data.train) == 32 + sum(c.included for c in canaries)
    start = trainable_state(hospital.model)
    ledger = PrivacyLedger(run_id=1, hospital=0) if private else None
    new, _ = hospital.train(start, 1, ledger=ledger)
    path = work / f"round-{private}.npz"
    np.savez(path, **{k: (new[k] - start[k]).numpy() for k in start})
    scores = white_box_scores([path], canaries)
    inside = [s for s, c in zip(scores, gradients, strict=True) if c.included]
    outside = [s for s, c in zip(scores, gradients, strict=True) if not c.included]
    assert inside and outside
    if private:  # Poisson sampling may skip a canary (p = (5/6)^18): most, not all, stand out
        assert sorted(inside)[len(inside) // 2] > 3 * max(abs(s) for s in outside)
    else:
        assert min(inside) > 3 * max(abs(s) for s in outside)


def test_audit_under_distributed_dp_scores_the_secure_sum_its_canaries_reach(
        tiny_bert, tmp_path, process_identity, monkeypatch):
    """privacy=distributed_dp over SecAgg+: hospital 0's gradient canaries go into its share
    (through its step loader and the clipped gradient sum, at the mechanism's clipping norm),
    the server records the one aggregate the protocol releases (every contributor's reply
    carries it), and on that sum, minus the round's mean gradient, an included canary scores
    C / B and an excluded one about 0. One round, every record drawn (q = 1), no noise."""
    canaries = make_canaries(12, len(SPECIALTIES))
    given = write_canaries([c for c in canaries if c.included], tmp_path / "given.jsonl")
    # C = 10 as in canary_hospital, here distributed DP's own clipping norm (no canary_norm).
    settings = task(tiny_bert, "model.max_length=32", "data.notes_per_hospital=40",
                    "privacy=distributed_dp", "secure_aggregation=secagg_plus",
                    "train.precision=fp32", "privacy.distributed_dp.target_epsilon=null",
                    "privacy.distributed_dp.noise_multiplier=1.0",
                    "privacy.distributed_dp.max_grad_norm=10",
                    f"audit.canaries_path={given}")
    # Simulated hospitals (no state-dir): a deployed one refuses the audit's canaries.
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    hospitals = ClientAppGrid(tmp_path, simulated=True)
    config = ConfigRecord({m.TASK_KEY: task_settings_to_yaml(settings)})
    # The server plans with the record counts of preflight: the canaries are counted.
    records = [r.train_records for r in run_preflight(hospitals, config, 2, 60)]
    assert records == [32 + sum(c.included for c in canaries), 32]
    plan = settings.privacy.distributed_dp  # what the server's plan would fill in
    # A hospital refuses sigma = 0; 1e-12 adds nothing measurable at this norm.
    plan.noise_multiplier, plan.sample_rate, plan.threshold = 1e-12, 1.0, 2
    plan.target_delta, plan.expected_batch_size = 1e-5, sum(records)
    start = trainable_state(Hospital(settings, list(SPECIALTIES), 0, 2).model)
    recorder = UpdateRecorder(FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2,
                                     min_train_nodes=2), 0, tmp_path / "updates", SECURE_SUM)
    secure = SecureAggregationGrid(hospitals, settings.secure_aggregation, 1, sum_updates=True)
    config = ConfigRecord({m.TASK_KEY: task_settings_to_yaml(settings)})
    replies = list(secure.send_and_receive(recorder.configure_train(
        1, ArrayRecord(start), config, secure)))
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies
                                                      if r.has_error()]
    arrays, _ = recorder.aggregate_train(1, replies)
    with np.load(tmp_path / "updates" / "round-1.npz") as kept:  # the released sum
        for name, value in arrays.items():
            np.testing.assert_allclose(kept[name], value.numpy() - start[name].numpy(),
                                       atol=1e-6)
    scores = white_box_scores([tmp_path / "updates" / "round-1.npz"], canaries)
    gradients = [c for c in canaries if c.kind == GRADIENT]
    inside = [s for s, c in zip(scores, gradients, strict=True) if c.included]
    outside = [s for s, c in zip(scores, gradients, strict=True) if not c.included]
    assert inside and outside
    assert min(inside) > 3 * max(abs(s) for s in outside)
    assert np.median(inside) == pytest.approx(10 / sum(records), rel=0.2)


def test_audit_canaries_are_refused_by_a_deployed_hospital(canary_hospital, tmp_path):
    settings, _, _ = canary_hospital
    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "".join(f"note {i} text,{SPECIALTIES[i % 2]}\n"
                                             for i in range(10)))
    settings.data.source = settings.data.source.files
    from tasks.errors import TaskInputError

    with pytest.raises(TaskInputError, match="audit canaries are for simulation only"):
        Hospital(settings, list(SPECIALTIES), 0, 1, data_path=str(data))


@pytest.mark.e2e
def test_audit_runs_end_to_end_on_the_tiny_model(superlink, tiny_bert, tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.commands.audit", "--canaries", "40", "--guesses", "10",
         "--out", str(out), f"model.name_or_path={tiny_bert}", "data.notes_per_hospital=60",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "model.lora.dropout=0.0",
         "audit.canary_norm=10", NO_DEID],  # canaries of norm 10: see canary_hospital
        cwd=ROOT, env=superlink.env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["epsilon_claimed"] == math.inf and report["delta"] == 1e-5
    for mode in ("white_box", "black_box"):
        assert report[mode]["canaries"] == 40 and report[mode]["guesses"] == 20
    # Non-private and white-box: the server's view gives every canary away.
    assert report["white_box"]["correct"] >= 19
    assert report["white_box"]["epsilon_lower_bound"] > 1.0
    client = mlflow_client(tmp_path)
    run = client.get_run(report["mlflow_run_id"])
    assert "audit/white_box_epsilon_lower_bound" in run.data.metrics
    assert run.data.tags["audit.verdict"] == "passed"  # a non-private run claims no epsilon
    assert {a.path for a in client.list_artifacts(run.info.run_id, "audit")} == {
        "audit/report.json"}
    assert NOTE and report["black_box"]["epsilon_lower_bound"] >= 0

"""The hospital-local white-box audit (issue 33, parts 1 and 2): the Gaussian one-run bound
against independent computations, the measured-noise bound, and four injected bugs that the
audit must catch at a claimed epsilon of 1 while the correct code passes the same audit.

The bugs (tests/audit_injections.py) are injected by patching the libraries and functions the
product really runs (Opacus' noise and clipping, the product's sampler, the distributed-DP
share's noise), never by product flags. Confidence 0.99 throughout, so a correct run is
flagged with probability under 1% (in practice far less: the one-run bounds sit far below a
correct claim).
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest

from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings
from clinical_fl.settings.privacy import Accountant
from clinical_fl.settings.train import OptimizerName, TrainSettings
from tasks.audit import bound, gaussian_bound
from tasks.audit.local import LocalAudit, audit_distributed_dp, audit_dp_sgd
from tasks.audit.noise_check import measured_noise
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.errors import TaskInputError
from tasks.model.build import build_model, load_tokenizer
from tasks.privacy.accounting import epsilon_spent
from tests.audit_injections import (
    clipping_skipped,
    half_the_noise,
    predictable_sampling,
    share_for_twice_the_threshold,
)

CLAIM = 1.0
# Where the bugs show: DP-SGD at q 0.02 for 100 steps (noise ~1.3 for epsilon 1, a canary
# drawn about twice), distributed DP at q 0.05 for 40 rounds.
DP_SGD_AUDIT = LocalAudit(mechanism="dp_sgd", target_epsilon=CLAIM, canaries=1500,
                          sample_rate=0.02, epochs=2, confidence=0.99)
DISTRIBUTED_AUDIT = LocalAudit(mechanism="distributed_dp", target_epsilon=CLAIM, canaries=1000,
                               sample_rate=0.05, rounds=40, threshold=3, confidence=0.99)


# --- the Gaussian one-run bound ---------------------------------------------------------------

@pytest.mark.parametrize("mu", [0.25, 0.5, 1.0, 2.0])
def test_audit_gaussian_epsilon_matches_dp_accounting(mu):
    """epsilon(delta) of mu-GDP is the Gaussian mechanism's of noise 1/mu (sensitivity 1);
    dp-accounting's privacy loss distribution of that mechanism, finely discretised, agrees."""
    delta = 1e-5
    pld = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1 / mu, value_discretization_interval=1e-4)
    assert gaussian_bound.gaussian_epsilon(mu, delta) == pytest.approx(
        pld.get_epsilon_for_delta(delta), rel=2e-3)


def _gaussian_game(m: int, mu: float, games: int, rng: np.random.Generator):
    """The idealised game for a mu-GDP mechanism: canary scores N(mu, 1) if in, N(0, 1) if
    out (the most powerful test); returns (included, scores) for each game."""
    included = rng.random((games, m)) < 0.5
    return included, rng.normal(mu * included, 1.0)


def _correct(included, scores, k):
    order = np.argsort(scores, axis=1)
    rows = np.arange(len(scores))[:, None]
    return (included[rows, order[:, -k:]].sum(axis=1)
            + (~included[rows, order[:, :k]]).sum(axis=1))


def test_audit_gaussian_bound_is_sound_in_the_gaussian_game():
    """A mu-GDP mechanism is rejected at 95% in at most about 5% of games: the count of right
    guesses that first rejects mu is reached that rarely when the mechanism is exactly mu-GDP
    (5,000 simulated games; the recursion is an upper bound, so the rate is usually lower)."""
    m, k, mu, alpha = 400, 40, 1.0, 0.05
    first = next(v for v in range(k, 2 * k + 1)
                 if gaussian_bound.rejects(m, 2 * k, v, mu, alpha))
    included, scores = _gaussian_game(m, mu, 5000, np.random.default_rng(7))
    assert (_correct(included, scores, k) >= first).mean() <= alpha + 0.01


def test_audit_gaussian_bound_is_tighter_than_counting_for_a_gaussian_mechanism():
    """On the same guesses of a Gaussian mechanism (epsilon 2 at delta 1e-5), the f-DP bound
    is above Steinke et al.'s counting bound, and both below the truth."""
    mu, m, k, delta = 0.502, 10000, 500, 1e-5
    included, scores = _gaussian_game(m, mu, 1, np.random.default_rng(3))
    v = int(_correct(included, scores, k)[0])
    gaussian = gaussian_bound.epsilon_lower_bound(m, 2 * k, v, delta)
    counting = bound.epsilon_lower_bound(m, 2 * k, v, delta)
    assert counting < gaussian < gaussian_bound.gaussian_epsilon(mu, delta)
    assert gaussian > 0.5


def test_audit_gaussian_bound_is_zero_without_evidence():
    assert gaussian_bound.epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert gaussian_bound.mu_lower_bound(1000, 200, 200) > 1.0  # every guess right


def test_audit_measured_noise_bound_stays_below_a_true_claim():
    """Releases with exactly the claimed noise: the measured multiplier's upper limit is above
    it (at 99%), so the bound is below the claim; with half the noise it is far above."""
    rng = np.random.default_rng(11)
    rate, steps, sigma, delta = 0.05, 40, 1.7, 1e-5
    claim = epsilon_spent([(sigma, rate, steps)], delta, Accountant.rdp)
    included = rng.random(1000) < 0.5
    drawn = rng.random((steps, 1000)) < rate
    for noise, above in ((sigma, False), (sigma / 2, True)):
        observed = drawn * included + rng.normal(0, noise, (steps, 1000))
        measured = measured_noise(observed, included, rate, steps, delta, Accountant.rdp, 0.99)
        assert (measured["epsilon_lower_bound"] > claim) is above
        assert measured["noise_multiplier_upper"] >= noise


# --- the audit of the product's own code --------------------------------------------------------

@pytest.fixture(scope="module")
def audited(tiny_random_bert):
    settings = ModelSettings(name_or_path=str(tiny_random_bert), max_length=16)
    tokenizer = load_tokenizer(settings)
    data = load_hospital_data(DataSettings(notes_per_hospital=40), list(SPECIALTIES), 0, 2)

    def run(audit: LocalAudit) -> dict:
        model = build_model(settings, list(SPECIALTIES), 0, tokenizer)
        if audit.mechanism == "dp_sgd":
            train = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=0.01,
                                  head_learning_rate=None)
            return audit_dp_sgd(model, tokenizer, data.train, len(SPECIALTIES), train, audit)
        return audit_distributed_dp(model, tokenizer, data.train, len(SPECIALTIES), audit)
    return run


def test_audit_local_passes_the_correct_dp_sgd(audited):
    report = audited(DP_SGD_AUDIT)
    assert report["epsilon_claimed"] == pytest.approx(CLAIM, abs=0.01)
    assert not report["failed"], report["best"]
    assert report["measured_noise"]["noise_multiplier_upper"] >= report["noise_multiplier"]


def test_audit_local_passes_the_correct_distributed_dp_share(audited):
    report = audited(DISTRIBUTED_AUDIT)
    assert report["epsilon_claimed"] == pytest.approx(CLAIM, abs=0.01)
    assert not report["failed"], report["best"]


def test_audit_inject_predictable_sampling(audited):
    """The server replays a sampler it can predict, knows each canary's steps, and the bound
    passes the claim."""
    with predictable_sampling():
        report = audited(DP_SGD_AUDIT)
    assert report["failed"] and report["best"]["score"] == "replayed_sampling", report["best"]


def test_audit_inject_half_the_noise(audited):
    with half_the_noise():
        report = audited(DP_SGD_AUDIT)
    assert report["failed"], report["best"]
    assert report["measured_noise"]["noise_multiplier"] == pytest.approx(
        report["noise_multiplier"] / 2, rel=0.05)


def test_audit_inject_gradients_that_skip_clipping(audited):
    with clipping_skipped():
        report = audited(DP_SGD_AUDIT)
    assert report["failed"] and report["best"]["score"] == "secret_sampling", report["best"]


def test_audit_inject_share_that_assumes_twice_the_threshold(audited):
    with share_for_twice_the_threshold():
        report = audited(DISTRIBUTED_AUDIT)
    assert report["failed"], report["best"]


def test_audit_inject_fails_the_command_and_tags_the_mlflow_run(tiny_random_bert, tmp_path):
    """``clinical-fl-audit-local``: exit code 3 and ``audit.verdict=failed`` on the MLflow run
    when the noise is halved; 0 and ``passed`` on the correct code."""
    from mlflow.tracking import MlflowClient

    from fl_app.commands import local_audit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--epsilon", "1", "--canaries", "300", "--accountant", "rdp",
            "--out", str(tmp_path / "report.json"),
            f"model.name_or_path={tiny_random_bert}", "model.max_length=16",
            f"tracking.uri={uri}", "data.notes_per_hospital=40"]
    assert local_audit.main(argv) == 0
    with half_the_noise():
        assert local_audit.main(argv) == local_audit.FAILED
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(local_audit.EXPERIMENT)
    verdicts = sorted(r.data.tags["audit.verdict"]
                      for r in client.search_runs([experiment.experiment_id]))
    assert verdicts == ["failed", "passed"]


@pytest.mark.parametrize("option, value", [
    ("sample_rate", 0.0), ("sample_rate", 1.5), ("target_epsilon", float("inf")),
    ("canaries", 1), ("threshold", 1), ("confidence", 1.0), ("mechanism", "central_dp")])
def test_audit_local_refuses_options_out_of_range_naming_them(option, value):
    with pytest.raises(TaskInputError, match=option):
        LocalAudit(**{"mechanism": "dp_sgd", "target_epsilon": 1.0, option: value})


def test_audit_local_command_refuses_a_bad_option_before_training(capsys):
    from fl_app.commands import local_audit

    assert local_audit.main(["--sample-rate", "0"]) == 1
    assert "sample_rate" in capsys.readouterr().err

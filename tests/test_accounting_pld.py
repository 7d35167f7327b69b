"""PLD accounting (``accountant: pld``, the default; issue 33, 5): epsilon from dp-accounting's
privacy loss distributions, checked against the same library's PLD built by hand (its
lower-level API, composed entry by entry), never above RDP's (the cross-check), tight enough to
need less noise, and calibrated as exactly as bisection would."""

from __future__ import annotations

import math

import pytest
from dp_accounting.pld import privacy_loss_distribution as pld

from clinical_fl.settings.compose import compose_config, to_run_settings
from clinical_fl.settings.privacy import Accountant
from tasks.privacy.accounting import (
    PLD_RDP_CEILING,
    calibrate_noise_multiplier,
    epsilon_spent,
)

HISTORIES = [
    [(0.7, 0.0667, 180)],  # the product-like setting: RDP 15.4, PLD 13.2
    [(1.1, 0.02, 500), (0.9, 0.05, 30)],  # a lifetime of two runs
    [(20.0, 1.0, 1), (1.0, 0.1, 100)],  # a label-count release, then a run
    [(3.0, 0.5, 4), (0.5, 0.01, 2_000)],
]


def _by_hand(history, delta):
    """The Poisson-subsampled Gaussian's PLD per entry, self-composed and composed: the
    pair of distributions the zero-out relation gives (docs/privacy-accounting.md)."""
    total = None
    for noise, rate, steps in history:
        entry = pld.from_gaussian_mechanism(standard_deviation=noise, sampling_prob=rate,
                                            pessimistic_estimate=True,
                                            value_discretization_interval=1e-4)
        entry = entry.self_compose(steps)
        total = entry if total is None else total.compose(entry)
    return total.get_epsilon_for_delta(delta)


@pytest.mark.parametrize("history", HISTORIES)
def test_audit_pld_epsilon_is_dp_accountings_own_computation(history):
    assert epsilon_spent(history, 1e-5, Accountant.pld) == pytest.approx(
        _by_hand(history, 1e-5), rel=1e-6)


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_audit_pld_epsilon_is_never_above_rdps(history, delta):
    assert epsilon_spent(history, delta, Accountant.pld) <= epsilon_spent(
        history, delta, Accountant.rdp)


def test_audit_pld_calibrates_less_noise_for_the_same_target():
    rdp = calibrate_noise_multiplier(8.0, 1e-5, 0.0667, 180, Accountant.rdp)
    tighter = calibrate_noise_multiplier(8.0, 1e-5, 0.0667, 180, Accountant.pld)
    assert tighter < 0.95 * rdp  # 0.877 against 0.931
    assert epsilon_spent([(tighter, 0.0667, 180)], 1e-5, Accountant.pld) <= 8.0


@pytest.mark.parametrize("target,delta,rate,steps,preceding", [
    (8.0, 1e-5, 0.0667, 180, ()),  # the setting: 0.877
    (3.0, 1e-5, 0.1, 60, ((20.0, 1.0, 1),)),  # after a release of noisy label counts
])
def test_audit_pld_calibration_is_the_smallest_noise_within_the_tolerance(
        target, delta, rate, steps, preceding):
    """Calibration under PLD starts from RDP's noise and computes few PLD figures
    (accounting.py::_pld_bracket), yet its answer is what bisection on PLD promises: the noise
    meets the target under PLD, and 0.1% less noise does not."""
    noise = calibrate_noise_multiplier(target, delta, rate, steps, Accountant.pld,
                                       preceding=preceding)

    def spent(sigma):
        return epsilon_spent([*preceding, (sigma, rate, steps)], delta, Accountant.pld)
    assert spent(noise) <= target < spent(noise * (1 - 1e-3))
    assert noise < calibrate_noise_multiplier(target, delta, rate, steps, Accountant.rdp,
                                              preceding=preceding)


def test_audit_pld_calibration_after_a_release_pld_gives_no_figure_for_is_refused():
    """RDP's noise is the upper end only where PLD gives a figure at all: after a release with
    noise below PRV_MIN_NOISE (no PLD figure), no noise meets the target."""
    with pytest.raises(ValueError, match="no noise multiplier reaches"):
        calibrate_noise_multiplier(60.0, 1e-5, 0.1, 10, Accountant.pld,
                                   preceding=[(0.15, 1.0, 1)])


def test_audit_pld_gives_no_figure_for_noise_without_meaning_and_no_steps_cost_nothing():
    assert epsilon_spent([(0.01, 0.5, 10)], 1e-5, Accountant.pld) == math.inf
    # Little noise over many steps (20 GiB as a PLD): RDP's figure, the higher bound.
    hostile = [(0.2, 1.0, 100_000)]
    assert epsilon_spent(hostile, 1e-5, Accountant.pld) == epsilon_spent(
        hostile, 1e-5, Accountant.rdp) > PLD_RDP_CEILING
    assert epsilon_spent([(1.0, 0.5, 0)], 1e-5, Accountant.pld) == 0.0
    with pytest.raises(ValueError, match="noise multiplier"):
        epsilon_spent([(-1.0, 0.5, 10)], 1e-5, Accountant.pld)


def test_audit_pld_is_the_default_of_both_mechanisms_and_rdp_remains():
    for mechanism in ("dp_sgd", "distributed_dp"):
        run = to_run_settings(compose_config([f"privacy={mechanism}"]))
        assert getattr(run.privacy, mechanism).accountant == Accountant.pld
        run = to_run_settings(compose_config([f"privacy={mechanism}",
                                              f"privacy.{mechanism}.accountant=rdp"]))
        assert getattr(run.privacy, mechanism).accountant == Accountant.rdp

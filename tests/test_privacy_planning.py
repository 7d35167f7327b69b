"""The server tells each hospital how many rounds to calibrate its DP-SGD noise for."""

import pytest

from fl_app.server.server_app import planned_rounds_per_hospital


@pytest.mark.parametrize("rounds,hospitals,fraction,minimum,expected", [
    (4, 2, 1.0, 2, 4),     # everyone trains every round
    (10, 10, 0.3, 2, 3),   # 3 of 10 per round: 3 rounds each on average
    (10, 10, 0.05, 2, 2),  # Flower samples at least min_hospitals
    (5, 3, 0.5, 1, 2),     # int(1.5) = 1 of 3 per round: ceil(5/3)
    (1, 5, 0.1, 1, 1),     # never below one round
])
def test_planned_rounds_follow_flowers_sampling(rounds, hospitals, fraction, minimum, expected):
    assert planned_rounds_per_hospital(rounds, hospitals, fraction, minimum) == expected

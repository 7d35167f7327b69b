"""What releasing noisy label counts costs a DP-SGD hospital (privacy.dp_sgd.label_count_noise).

    .venv/bin/python benchmarks/label_count_noise_cost.py

For each sigma: the release's own epsilon, and the noise multiplier DP-SGD is calibrated to
when the release comes first (tasks/privacy/plan.py), against none. The hospital is the
default run's (240 training notes, batch 16, 3 local epochs, 4 rounds, delta 1e-5).
"""

from __future__ import annotations

import argparse

from clinical_fl.settings.privacy import Accountant
from tasks.privacy.accounting import calibrate_noise_multiplier, epsilon_spent
from tasks.privacy.label_counts import release_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4 * 3 * 15, help="planned DP-SGD steps")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    rate = args.batch / args.records
    print("| target epsilon | sigma of the counts | release alone: epsilon | DP-SGD noise "
          "multiplier | without the release |")
    print("|---|---|---|---|---|")
    for target in (1.0, 3.0, 8.0):
        alone = calibrate_noise_multiplier(target, args.delta, rate, args.steps, Accountant.rdp)
        for sigma in (5.0, 10.0, 20.0, 50.0):
            step = release_step(sigma)
            noise = calibrate_noise_multiplier(target, args.delta, rate, args.steps,
                                               Accountant.rdp, preceding=(step,))
            print(f"| {target:g} | {sigma:g} | "
                  f"{epsilon_spent([step], args.delta, Accountant.rdp):.3f} | {noise:.4f} | "
                  f"{alone:.4f} |")


if __name__ == "__main__":
    main()

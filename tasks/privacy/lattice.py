"""SecAgg+'s lattice, and a distributed DP share on it.

SecAgg+ adds integers modulo 2^32: a value v of [-c, c] is carried as the level
(v + c) / Delta, Delta = 2c / T (c = ``secure_aggregation.clipping_range``, T =
``secure_aggregation.quantization_range``), and the server reads a sum of n levels back as
sum x Delta - n c (``clinical_fl/secure_aggregation/masking.py``). Distributed DP's shares are
built on that lattice directly, in integers, so that nothing after the noise depends on the records:

- the signal (a hospital's clipped gradient sum over B, before noise) is clipped to [-c, c]
  per value (a 1-Lipschitz map: it cannot raise the sensitivity) and rounded stochastically
  to a level: floor(x / Delta + U), U uniform. With the same U, two signals at distance r
  round to levels at most r + Delta sqrt(d) apart;
- the noise n ~ N(0, s^2) becomes floor(n / Delta + U'), a map that commutes with lattice
  shifts (floor((n + k Delta) / Delta + U') = floor(n / Delta + U') + k), so a share shifted
  by a lattice vector is a post-processing of the Gaussian shifted by the same vector;
- signal + noise levels are sent modulo 2^32 without clamping: the server reads the sum over
  hospitals as the value nearest 0 modulo 2^32 levels, exact while it stays within +-2^31
  levels (256 c at T = 2^24; the server logs how much of that each sum used:
  ``secure_aggregation/range_used``).

Floating-point sampling of the Gaussian itself is outside this analysis, as in Opacus' default
(non-``secure_mode``) noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MODULUS = 2**32


@dataclass(frozen=True)
class Lattice:
    clipping_range: float  # c
    levels: int  # T: [-c, c] is carried as the levels 0..T

    @property
    def step(self) -> float:
        """Delta: the value of one level."""
        return 2 * self.clipping_range / self.levels

    def round_signal(self, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The signal's levels (int64, in [0, T]): clipped to [-c, c], rounded stochastically."""
        c = self.clipping_range
        scaled = (np.clip(signal, -c, c) + c) / self.step
        return np.floor(scaled + rng.random(signal.shape)).astype(np.int64)

    def noise_levels(self, std: float, size: int, rng: np.random.Generator) -> np.ndarray:
        """Gaussian noise of standard deviation ``std`` (value units) as levels (int64,
        centred on 0): floor(n / Delta + U)."""
        if std == 0:
            return np.zeros(size, dtype=np.int64)
        noise = rng.normal(0.0, std / self.step, size=size)
        return np.floor(noise + rng.random(size)).astype(np.int64)

    @staticmethod
    def encode(levels: np.ndarray) -> np.ndarray:
        """Levels as SecAgg+ adds them: uint32, modulo 2^32 (negative levels wrap)."""
        return np.mod(levels, _MODULUS).astype(np.uint32)

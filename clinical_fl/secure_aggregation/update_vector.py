"""What a hospital aggregates securely: its weighted update as one flat vector.

The update is the trained adapter minus the global adapter it started from, so the
clipping range of SecAgg+ and the scale of CKKS are about the size of one round's change,
not of the weights. Each hospital multiplies it by its weight share w / w_max <= 1 (FedAvg
weights by records) and appends that share, so the server, from the sum alone, gets the
weighted mean: sum(share_k x update_k) / sum(share_k).
"""

from __future__ import annotations

import numpy as np


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The arrays in their record's order, as one float64 vector."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``flatten``: float32 arrays with the names and shapes of ``like``."""
    out, start = {}, 0
    for name, array in like.items():
        out[name] = vector[start:start + array.size].reshape(array.shape).astype(np.float32)
        start += array.size
    if start != vector.size:
        raise ValueError(f"a vector of {vector.size} values for arrays of {start}")
    return out


def weight_share(weight: float, max_weight: float, levels: int) -> int:
    """The hospital's weight share w / w_max on a grid of ``levels`` steps (an integer, so the
    share SecAgg+ sums is the very share the update was multiplied by)."""
    if not 0 <= weight <= max_weight:
        raise ValueError(f"aggregation weight {weight} outside [0, max-weight {max_weight}]: "
                         "the server's max-weight must bound every hospital's weight")
    return round(weight / max_weight * levels)


def weighted_update(trained: dict[str, np.ndarray], start: dict[str, np.ndarray],
                    share: float) -> np.ndarray:
    """(trained - start) x share, flattened, with the share appended as the last value."""
    if list(trained) != list(start):
        raise ValueError("the trained adapter's arrays differ from the global adapter's: "
                         f"{sorted(set(trained) ^ set(start))}")
    update = (flatten(trained) - flatten(start)) * share
    return np.append(update, share)


def weighted_mean(total: np.ndarray, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The global adapter after the round, from the sum of the hospitals' weighted updates
    (``weighted_update``) and the adapter they all started from."""
    shares = total[-1]
    if shares <= 0:
        raise ValueError(f"the sum of the weight shares is {shares}: nothing to average")
    return unflatten(flatten(start) + total[:-1] / shares, start)


def summed(total: np.ndarray, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter plus the plain sum of the hospitals' updates (every weight share 1):
    distributed DP's hospitals send shares of one noisy step that add up, not average."""
    return unflatten(flatten(start) + total[:-1], start)

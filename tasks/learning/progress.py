"""How far a hospital's local training is: epoch, steps done of all, seconds so far.

One line when training starts, then at most one every ``every_s`` seconds, and one at the
end, so a ten-minute round on long notes is not ten minutes of silence in the hospital's
log and a short round is two lines. The lines go to the ``tasks`` logger, which the
hospital's edge sends to its own ``hospital.log`` (never to the server): under DP-SGD the
time a step takes depends on the Poisson batch sizes.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class TrainingProgress:
    def __init__(self, epochs: int, steps_per_epoch: int, what: str = "local training",
                 every_s: float = 30.0) -> None:
        self.epochs, self.steps_per_epoch, self.what = epochs, steps_per_epoch, what
        self.every_s = every_s
        self.total = epochs * steps_per_epoch
        self.done = 0
        self.start = time.monotonic()
        self._next = self.start + every_s
        log.info("%s: %d epoch(s) of %d steps (%d steps)", what, epochs, steps_per_epoch,
                 self.total)

    def step(self, epoch: int) -> None:
        """One optimizer step of ``epoch`` (counted from 0) is done."""
        self.done += 1
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            log.info("%s: epoch %d/%d, step %d/%d, %.0f s", self.what, epoch + 1,
                     self.epochs, self.done, self.total, now - self.start)

    def finish(self) -> None:
        log.info("%s: done, %d/%d steps in %.0f s", self.what, self.done, self.total,
                 time.monotonic() - self.start)

"""Where a run came from, as MLflow tags: the checkout's git commit and the Flower run.

The ServerApp runs from a copy of the app bundle (FAB) under ``$FLWR_HOME``, so MLflow's own
git detection (from the running script) finds no checkout; the commit is asked of the
checkout the package was installed from (``clinical_fl/tracking/paths.py::project_root``).
The Flower run id and the FAB hash are what ``flwr ls`` shows, so that MLflow and Flower can
be joined.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow's standard tags (mlflow.utils.mlflow_tags), and ours where MLflow has none.
GIT_COMMIT = "mlflow.source.git.commit"
GIT_BRANCH = "mlflow.source.git.branch"
GIT_DIRTY = "git_dirty"
FLOWER_RUN_ID = "flwr.run_id"
FLOWER_APP = "flwr.app"  # @<fab id>==<fab version>, as flwr ls shows it
FLOWER_FAB_HASH = "flwr.fab_hash"


def _git(root: Path, *args: str) -> str:
    # No optional locks: ``git status`` must not write the checkout's index while a user works.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=20, check=True, env=env)
    return done.stdout.strip()


def git_tags(root: Path) -> dict[str, str]:
    """The commit checked out at ``root``, its branch (not when detached) and whether tracked
    files differ from it; nothing when ``root`` is not a git checkout or git is missing."""
    try:
        commit = _git(root, "rev-parse", "--verify", "HEAD")
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("no git commit for %s: %s", root, err)
        return {}
    if not commit:
        return {}
    tags = {GIT_COMMIT: commit, GIT_DIRTY: str(dirty).lower()}
    if branch and branch != "HEAD":
        tags[GIT_BRANCH] = branch
    return tags


@dataclass(frozen=True)
class FlowerRun:
    """The Flower run a ServerApp serves: its id, and the app bundle it runs from."""

    run_id: int | None
    fab_id: str = ""
    fab_version: str = ""
    fab_hash: str = ""

    @classmethod
    def of(cls, context: Any, grid: Any) -> FlowerRun:
        """From the ServerApp's Context and Grid (``grid.run``: Flower's ``Run`` record)."""
        try:
            run = grid.run
        except Exception:  # a Grid without its run set: the id is enough
            run = None
        return cls(run_id=getattr(context, "run_id", None),
                   fab_id=str(getattr(run, "fab_id", "") or ""),
                   fab_version=str(getattr(run, "fab_version", "") or ""),
                   fab_hash=str(getattr(run, "fab_hash", "") or ""))

    def tags(self) -> dict[str, str]:
        tags = {}
        if self.run_id is not None:
            tags[FLOWER_RUN_ID] = str(self.run_id)
        if self.fab_id:
            tags[FLOWER_APP] = f"@{self.fab_id}=={self.fab_version}"
        if self.fab_hash:
            tags[FLOWER_FAB_HASH] = self.fab_hash
        return tags

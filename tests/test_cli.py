import os
import re
import shutil
import subprocess

import pytest
from flwr.common.config import parse_config_args

from fl_app.cli import (
    check_command_line,
    command_line,
    flwr_run_command,
    sweep_jobs,
    write_run_config,
)
from fl_app.flower_runs import started_run_id
from settings.compose import ConfigError, parse_overrides
from tests.flower_processes import VENV_BIN


@pytest.mark.parametrize("overrides", [
    ["train.local_epochs=2", "tracking.run_name='a b'"],
    ["tracking.uri=sqlite\\:////tmp/x/mlflow.db", "privacy.dp_sgd.target_epsilon=inf"],
    ['tracking.run_name="a b"', "+sweep=epsilon", "tracking.experiment='c d'"],
])
def test_hydra_overrides_reach_the_server_app_through_flowers_own_parser(overrides, tmp_path):
    command = flwr_run_command(write_run_config(overrides, tmp_path / "run.toml"))
    assert command[:2] == ["flwr", "run"] and "--stream" in command
    run_config = parse_config_args([command[command.index("--run-config") + 1]])
    # The ServerApp splits the string back into exactly the overrides Hydra received.
    assert parse_overrides(run_config["overrides"]) == overrides


def test_run_id_is_read_from_flwr_run_output():
    assert started_run_id("...\nSuccessfully started run 1234567\n...") == "1234567"
    assert started_run_id("Connection refused") is None


@pytest.mark.parametrize("arguments,message", [
    # DP-SGD's target without DP-SGD switched on: it used to run without DP-SGD.
    (["privacy.dp_sgd.target_epsilon=3"],
     r"privacy\.dp_sgd\.target_epsilon.*privacy=dp_sgd"),
    # An addition to the schema: it used to be added by Hydra, then dropped.
    (["+train.lr=0.01"], r"unknown key 'train\.lr'.*valid keys in 'train'"),
    # A sweep whose second series is refused: the first must not start either.
    (["-m", "+sweep=epsilon", "privacy=distributed_dp,dp_sgd",
      "privacy.distributed_dp.expected_batch_size=32"],
     r"privacy\.distributed_dp\.expected_batch_size.*privacy=distributed_dp"),
])
def test_clinical_fl_refuses_bad_settings_before_flower_starts(arguments, message, tmp_path):
    """The real console script, with no ``flwr`` on its PATH: a run that got as far as
    ``flwr run`` would fail for want of it; these fail on the settings instead."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    assert shutil.which("flwr", path=env["PATH"]) is None
    out = subprocess.run([str(VENV_BIN / "clinical-fl"), *arguments], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert re.search(f"error: invalid configuration.*{message}", out.stderr), out.stderr[-3000:]
    assert "flwr" not in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_command_line_checks_every_job_of_a_sweep_before_the_first():
    assert command_line(["-m", "+sweep=epsilon", "a.b=1,2", "--config-name", "config"]) == (
        ["+sweep=epsilon", "a.b=1,2"], True)
    assert sorted(job[0] for job in sweep_jobs(["+sweep=epsilon"])) == [
        f"privacy.dp_sgd.target_epsilon={level}" for level in ("1", "3", "8", "inf")]
    # tests/test_sweep.py's sweep: both series, every level valid.
    check_command_line(["-m", "+sweep=epsilon", "privacy=dp_sgd,distributed_dp",
                        "privacy.dp_sgd.target_epsilon=8", "num_rounds=2"])
    with pytest.raises(ConfigError, match=r"privacy\.dp_sgd\.target_epsilon.*privacy=dp_sgd"):
        check_command_line(["-m", "privacy=dp_sgd,none", "privacy.dp_sgd.target_epsilon=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lr'"):
        check_command_line(["+train.lr=0.01"])
    check_command_line(["privacy.dp_sgd.target_epsilon=3"])  # a single run's values: in _run

import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest
from flwr.common.config import parse_config_args

from clinical_fl.settings.compose import ConfigError, parse_overrides
from clinical_fl.settings.data import DataSettings, DataSource
from fl_app.commands import flower_runs
from fl_app.commands.cli import (
    check_command_line,
    command_line,
    flwr_run_command,
    sweep_jobs,
    write_run_config,
)
from fl_app.commands.flower_env import flower_env, flower_executable
from fl_app.commands.flower_runs import started_run_id
from fl_app.server.data_check import check_data, server_labels
from tests.flower_processes import VENV_BIN

NOWHERE = "no-such-superlink"  # a connection flwr run refuses at once: nothing starts


def bare_env(tmp_path, **extra):
    """The environment of a user who never activated the venv: no .venv/bin on PATH, no
    flwr anywhere on it, a Flower home of their own, and (should a check be missed) a
    connection that ``flwr run`` refuses before it starts a SuperLink."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin",
           "FLWR_HOME": str(tmp_path / "flwr-home"), "CLINICAL_FL_CONNECTION": NOWHERE,
           **extra}
    assert shutil.which("flwr", path=env["PATH"]) is None
    return env


def run_cli(script, arguments, tmp_path, timeout=60, **extra):
    """Run a console script from a fresh working directory; returns (result, seconds)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    started = time.monotonic()
    out = subprocess.run([str(VENV_BIN / script), *arguments], env=bare_env(tmp_path, **extra),
                         cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return out, time.monotonic() - started


@pytest.mark.parametrize("overrides", [
    ["train.local_epochs=2", "tracking.run_name='a b'"],
    ["tracking.uri=sqlite\\:////tmp/x/mlflow.db", "privacy.dp_sgd.target_epsilon=inf"],
    ['tracking.run_name="a b"', "+sweep=epsilon", "tracking.experiment='c d'"],
])
def test_hydra_overrides_reach_the_server_app_through_flowers_own_parser(overrides, tmp_path):
    command = flwr_run_command(write_run_config(overrides, tmp_path / "run.toml"))
    assert command[:2] == [str(VENV_BIN / "flwr"), "run"] and "--stream" in command
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
    """The real console script, from a bare shell: these fail on the settings, before any
    ``flwr`` command (which would only refuse the connection here) and leave nothing."""
    out, _ = run_cli("clinical-fl", arguments, tmp_path, timeout=120)
    assert out.returncode != 0
    assert re.search(f"error: invalid configuration.*{message}", out.stderr), out.stderr[-3000:]
    assert "flwr" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not any((tmp_path / "cwd").iterdir()), "no outputs/ folder, no log"
    assert not (tmp_path / "flwr-home").exists()


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


@pytest.mark.parametrize("arguments,message", [
    (["model.nope=1"], r"unknown key 'model\.nope'; valid keys in 'model' are \['chunk_stride', "
     r"'long_notes', 'lora', 'max_chunks', 'max_length', 'name_or_path', 'pooling'"),
    (["train.epochs=2"], r"unknown key 'train\.epochs'; valid keys in 'train' are .*; did you "
     r"mean 'train\.local_epochs'\?"),
    (["train.target_epsilon=3"], r"did you mean 'privacy\.dp_sgd\.target_epsilon' or "
     r"'privacy\.distributed_dp\.target_epsilon'\?"),
    (["privacy=dpsgd"], r"'privacy=dpsgd' chooses 'dpsgd', which is not an option of the config "
     r"group 'privacy'.*did you mean 'dp_sgd'\? valid options are \['central_dp', "
     r"'distributed_dp', 'dp_sgd', 'dp_sgd_central_dp', 'none'\]"),
    (["-m", "strategy=fedavg,fedprxo"], r"'fedprxo'.*did you mean 'fedprox'\?"),
    (["-m", "+sweep=epsilom"], r"did you mean 'epsilon'\? valid options are \['epsilon'\]"),
    (["model/nope=1"], r"config group 'model/nope', which does not exist"),
])
def test_unknown_keys_and_options_list_the_valid_ones_and_the_near_misses(arguments, message):
    with pytest.raises(ConfigError, match=message):
        check_command_line(arguments)


def test_clinical_fl_checks_the_data_path_in_seconds_and_leaves_nothing(tmp_path):
    """It used to take 51 s (Ray, a SuperLink, the ServerApp) and end in Flower's
    'Exit Code: 700' traceback."""
    out, seconds = run_cli("clinical-fl", ["data=files", "data.path=/nope/notes.csv"],
                           tmp_path, timeout=60)
    assert out.returncode != 0 and seconds < 30, seconds
    assert re.search(r"^error: invalid data at 'data\.path': .*/nope/notes\.csv.*no such file",
                     out.stderr, re.M), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "flwr" not in out.stdout + out.stderr
    assert not any((tmp_path / "cwd").iterdir())
    assert not (tmp_path / "flwr-home").exists(), "no Flower command ran"


def test_the_audit_checks_the_data_before_training(tmp_path):
    out, seconds = run_cli("clinical-fl-audit", ["data=files", "data.path=/nope/notes.csv"],
                           tmp_path, timeout=60)
    assert out.returncode == 1 and seconds < 30
    assert "invalid data at 'data.path'" in out.stderr and "Traceback" not in out.stderr


def test_the_command_lines_find_flwr_next_to_their_python(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert flower_executable("flwr") == str(VENV_BIN / "flwr")
    assert flwr_run_command(tmp_path / "run.toml")[0] == str(VENV_BIN / "flwr")
    # flwr ls, for a run's final status: the same flwr.
    seen = []
    monkeypatch.setattr(flower_runs.subprocess, "run", lambda command, **_: seen.append(
        command) or subprocess.CompletedProcess(command, 0, '{"runs": []}', ""))
    assert flower_runs.run_status("1") == ("unknown", "run 1 not found")
    assert seen[0][:2] == [str(VENV_BIN / "flwr"), "ls"]
    # The SuperLink that flwr run starts spawns flwr-simulation etc. by name: the venv first.
    assert flower_env()["PATH"].split(os.pathsep)[0] == str(VENV_BIN)
    assert flower_env(PATH="/x")["PATH"] == "/x", "a caller's own PATH wins"
    monkeypatch.setattr("fl_app.commands.flower_env.python_bin", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cannot find the 'flwr-nope' executable"):
        flower_executable("flwr-nope")


def test_clinical_fl_runs_flwr_without_the_venv_on_path(tmp_path):
    """.venv/bin/clinical-fl from a shell that never activated the venv reaches flwr (which
    here refuses the unknown connection: nothing is started)."""
    out, _ = run_cli("clinical-fl", ["num_rounds=1"], tmp_path, timeout=90)
    assert out.returncode != 0
    assert "FileNotFoundError" not in out.stderr and "Traceback" not in out.stderr
    assert f"'{NOWHERE}' not" in " ".join((out.stdout + out.stderr).split()), out.stdout[-2000:]
    assert "error: flwr run - (num_rounds=1): not started" in out.stderr
    assert not any((tmp_path / "cwd").iterdir())


def test_help_names_the_app_and_lists_the_groups(tmp_path):
    out, _ = run_cli("clinical-fl", ["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("clinical-fl: federated") and "cli " not in out.stdout
    assert "privacy: central_dp, distributed_dp, dp_sgd, dp_sgd_central_dp, none" in out.stdout
    assert "strategy: fedadam, fedavg" in out.stdout and "clinical_fl/settings/run.py" in out.stdout
    assert "local_epochs: 1" in out.stdout
    assert not any((tmp_path / "cwd").iterdir())


def test_a_sweep_checks_every_jobs_data(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid data at 'data\.path'") as err:
        check_command_line(["-m", "data=files", "data.path=/nope/notes.csv", "num_rounds=1,2"])
    assert err.value.key == "data.path"


ROWS = [{"note": "chest pain", "dx": "cardiology", "split": "train"},
        {"note": "wheeze", "dx": "pulmonology", "split": "train"},
        {"note": "crackles", "dx": "pulmonology", "split": "test"}]


@pytest.fixture
def export(tmp_path):
    path = tmp_path / "notes.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    return path


def files(path, **kw) -> DataSettings:
    return DataSettings(source=DataSource.files, path=str(path), text_column="note",
                        label_column="dx", **kw)


def test_the_servers_data_checks_name_the_setting(export, tmp_path):
    assert server_labels(files(export)) == ["cardiology", "pulmonology"]
    one_label = tmp_path / "one.csv"
    pd.DataFrame(ROWS[:1] * 2).to_csv(one_label, index=False)
    cases = [
        (files(export, split_column="split", test_split="holdout"), "data.test_split"),
        (DataSettings(source=DataSource.files, path=str(export)), "data.text_column"),
        (files(one_label), "data.label_column"),
        (files(tmp_path / "none*.csv"), "data.path"),
    ]
    for settings, key in cases:
        with pytest.raises(ConfigError, match=re.escape(f"invalid data at '{key}'")) as err:
            server_labels(settings)
        assert err.value.key == key
    # A label set given: the server reads nothing it does not need (a deployment's
    # hospitals read their own files), while a local simulation's are checked here.
    given = files(tmp_path / "absent.csv", labels=["cardiology", "oncology"])
    assert server_labels(given) == ["cardiology", "oncology"]
    with pytest.raises(ConfigError, match=r"invalid data at 'data\.path'"):
        check_data(given, hospitals_read_here=True)
    with pytest.raises(ConfigError, match=r"'pulmonology' is not in the global label set") as err:
        check_data(files(export, labels=["cardiology", "oncology"]), hospitals_read_here=True)
    assert err.value.key == "data.labels"

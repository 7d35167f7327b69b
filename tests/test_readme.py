"""The README's cheap commands, run as written: every documented executable exists next to
this Python and answers ``--help``; every ``scripts/run.sh --run-config`` and ``clinical-fl``
line passes the checks the real commands make before starting anything; the prediction
example is classified as its text says, on a tiny adapter registered the way a run
registers its model. (The runs themselves are the e2e tests' business.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from flwr.app import Context, RecordDict

from clinical_fl.serving import cli as serve_cli
from clinical_fl.settings.compose import compose_config
from clinical_fl.settings.data import DeidSettings
from clinical_fl.settings.model import ModelSettings
from fl_app.commands import cli, run_config_check
from fl_app.commands import ledger as ledger_cli
from fl_app.commands import predict as predict_cli
from fl_app.hospital.node_config import state_dir
from fl_app.server.run_summary import EXAMPLE_NOTE
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.model.build import build_model, load_trainable_state, save_adapter, trainable_state
from tests.flower_processes import ROOT

README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def commands(text: str = README) -> list[str]:
    """Every command line of the bash blocks of ``text``, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()  # a trailing comment
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def invocations(program: str, text: str = README) -> list[list[str]]:
    """The arguments of every line of ``text`` that runs ``program`` (a line of ``a && b``
    is two commands)."""
    found = []
    for line in commands(text):
        for command in line.split("&&"):
            words = shlex.split(command)
            if words and Path(words[0]).name == program or words[:2] == ["bash", program]:
                found.append(words[2:] if words[0] == "bash" else words[1:])
    return found


def test_the_readme_has_the_two_commands_on_its_first_screen():
    first_screen = README[:README.index("## What you get")]
    assert "```bash\nbash scripts/run.sh\n```" in first_screen
    assert "```bash\nbash scripts/test.sh\n```" in first_screen


def test_every_documented_executable_is_next_to_this_python():
    named = {Path(shlex.split(c)[0]).name for line in commands() for c in line.split("&&")
             if shlex.split(c)[0].startswith(".venv/bin/")}
    assert {"clinical-fl", "clinical-fl-predict", "clinical-fl-serve", "clinical-fl-ledger",
            "mlflow"} <= named
    for name in named:
        assert (BIN / name).is_file(), name


@pytest.mark.parametrize("main", [predict_cli.main, serve_cli.main, ledger_cli.main])
def test_every_command_answers_help(main, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_clinical_fl_help_introduces_the_app_and_its_groups():
    out = subprocess.run([str(BIN / "clinical-fl"), "--help"], capture_output=True, text=True,
                         timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "clinical-fl" in out.stdout and "privacy" in out.stdout
    assert "secure_aggregation" in out.stdout


def test_every_run_sh_line_passes_the_check_run_sh_makes_first():
    lines = [args for doc in [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
             for args in invocations("scripts/run.sh", doc)]
    assert len(lines) >= 15
    for args in lines:
        assert run_config_check.check(args) == [], args


def test_every_clinical_fl_line_is_a_valid_configuration():
    lines = [args for args in invocations("clinical-fl")
             if "--help" not in args and not any("<" in a or "/exports/" in a for a in args)]
    assert len(lines) >= 3
    for args in lines:
        cli.check_command_line(args)  # the keys; a sweep's every job
        overrides, multirun = cli.command_line(args)
        if not multirun:
            compose_config(overrides)


@pytest.fixture(scope="module")
def registered(tiny_bert, tmp_path_factory) -> str:
    """A tracking URI whose registry holds clinical-fl-note-classifier@current: a tiny adapter
    whose head reads cardiology into every note (the README's note is a cardiology one)."""
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=128)
    labels = list(SPECIALTIES)
    model = build_model(settings, labels, seed=0)
    state = trainable_state(model)
    bias = next(k for k in state if k.endswith("bias") and state[k].shape == (len(labels),))
    state[bias] = torch.full((len(labels),), -5.0)
    state[bias][labels.index("cardiology")] = 5.0
    load_trainable_state(model, state)
    root = tmp_path_factory.mktemp("readme")
    adapter = save_adapter(model, root / "adapter", settings, labels, DeidSettings())
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("readme", artifact_location=(root / "a").as_uri())
    run = client.create_run(experiment).info
    client.log_artifacts(run.run_id, str(adapter), "adapter")
    client.set_terminated(run.run_id)
    client.create_registered_model("clinical-fl-note-classifier")
    client.create_model_version("clinical-fl-note-classifier", f"{run.artifact_uri}/adapter",
                                run_id=run.run_id)
    client.set_registered_model_alias("clinical-fl-note-classifier", "current", "1")
    return uri


def test_the_prediction_example_runs_as_written(registered, capsys):
    examples = [args for args in invocations("clinical-fl-predict")
                if any(a.startswith("models:/") for a in args)]
    assert examples
    for args in examples:
        assert predict_cli.main([*args, "--tracking-uri", registered]) == 0
        header, row = capsys.readouterr().out.splitlines()
        assert header.startswith("note\tlabel\tprobability")
        assert row.split("\t")[1] == "cardiology"
    assert EXAMPLE_NOTE in README, "the README shows the note the run's summary suggests"


def test_the_ledger_command_reads_the_folder_a_default_run_creates(tmp_path, monkeypatch,
                                                                   capsys):
    (args,) = invocations("clinical-fl-ledger")[:1]
    assert args == [".flwr/clinical-fl/hospital-state/partition-0"]
    # scripts/run.sh and clinical-fl use the checkout's .flwr/ as FLWR_HOME; hospital 0 of a
    # simulation keeps its state here (made when it first answers)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / ".flwr"))
    folder = state_dir(Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                               state=RecordDict(), run_config={}))
    assert folder == tmp_path / args[0]
    folder.mkdir(parents=True)
    assert ledger_cli.main([str(folder)]) == 0
    assert "lifetime epsilon 0 (no private steps recorded)" in capsys.readouterr().out

"""Three hostile or mistaken servers through a real ``flwr run``: Flower's simulation runtime,
the product's ClientApp in its processes, the product's own server code behind a Grid that
rewrites what it sends (``tests/hostile_server_app.py``), a real MLflow store.

1. An honest server with a typo: ``data.label_column=text`` (the label column pointed at the
   notes). 2. Distributed DP with sigma = NaN. 3. Distributed DP over CKKS whose plan says
   t = 10,000 (each noise share would carry 1% of the noise).

The two simulated hospitals each hold an export with a canary in every cell and a policy file
(their own data mapping). Each scenario is refused with the right code, trains nothing, and no
canary reaches the server: not its console, the SuperLink's log and database, nor the MLflow
store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fl_app.commands.flower_runs import COMPLETED, run_status, started_run_id
from tests.flower_processes import ROOT
from tests.hostile_server import CANARY, LABELS, write_canary_export
from tests.support import mlflow_client, run_overrides

pytestmark = pytest.mark.e2e


def _hostile_app(target: Path) -> Path:
    """A Flower app whose ServerApp is the tampering one; the ClientApp is the product's."""
    target.mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace('serverapp = "fl_app.server.server_app:app"',
                        'serverapp = "hostile_server_app:app"')
    text = text.replace('overrides = ""', 'overrides = ""\nscenarios = ""')
    # this app is one module: the product's bundle patterns (its .md, .yaml, tests/) match
    # nothing here, which Flower refuses
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("fab-include", "fab-exclude")))
    (target / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "LICENSE", target / "LICENSE")
    shutil.copy(Path(__file__).with_name("hostile_server_app.py"),
                target / "hostile_server_app.py")
    return target


def _files_holding_canary(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            if CANARY.encode() in path.read_bytes():
                found.append(str(path))
    return found


def test_hostile_server_through_a_real_flwr_run(superlink, tiny_bert, tmp_path):
    home = Path(superlink.env["FLWR_HOME"])
    hospitals = home / "clinical-fl" / "hospital-state"
    for k in range(2):
        export = write_canary_export(tmp_path / "exports" / f"hospital{k}.csv", hospital=k)
        state = hospitals / f"partition-{k}"
        state.mkdir(parents=True, exist_ok=True)
        (state / "privacy-policy.toml").write_text(
            f'data-path = "{export}"\ntext-column = "text"\nlabel-column = "label"\n'
            'deid = "allowed"\nrequire-dp = true\n')
    store = tmp_path / "mlruns"
    common = run_overrides(tiny_bert, store, "data=files", f"data.labels=[{','.join(LABELS)}]",
                           "num_rounds=2")
    distributed = (f"{common} privacy=distributed_dp secure_aggregation=ckks "
                   "privacy.distributed_dp.expected_batch_size=16 num_rounds=2")
    scenarios = [
        {"overrides": f"{common} data.label_column=text privacy=dp_sgd"},
        {"overrides": distributed, "tamper": {"privacy.distributed_dp.noise_multiplier": "nan"}},
        {"overrides": distributed, "tamper": {"privacy.distributed_dp.threshold": 10_000}},
    ]
    run_config = tmp_path / "run_config.toml"
    run_config.write_text(f"scenarios = {json.dumps(json.dumps(scenarios))}\n")
    app_dir = _hostile_app(tmp_path / "hostile-app")
    out = subprocess.run(["flwr", "run", str(app_dir), "--stream", "--run-config",
                          str(run_config), "--federation-config", "num-supernodes=2"],
                         env=superlink.env, capture_output=True, text=True, timeout=600,
                         check=False)
    output = out.stdout + out.stderr
    run_id = started_run_id(output)
    assert run_id, output[-3000:]
    status, details = run_status(run_id, env=superlink.env)
    assert status == COMPLETED, (status, details, output[-3000:])

    client = mlflow_client(store)
    runs = sorted(client.search_runs([e.experiment_id for e in client.search_experiments()]),
                  key=lambda r: r.info.start_time)
    assert len(runs) == 3, output[-3000:]
    typo, nan_sigma, huge_t = (run.data.tags for run in runs)
    # 1. Stopped at preflight: both hospitals name the key they refuse, nothing else.
    assert runs[0].info.status == "FAILED"
    assert typo["failure"].count("data-mapping-refused (data.label_column)") == 2, typo
    # 2. sigma = NaN: refused by both hospitals' settings check, before any step.
    assert runs[1].info.status == "FAILED"
    assert nan_sigma["failure"].count(
        "settings-invalid (privacy.distributed_dp.noise_multiplier)") == 2, nan_sigma
    # 3. t = 10,000: both refuse the round (their share assumes a sum the round cannot reach),
    # the round releases nothing, and the server stops asking them.
    assert "secure_aggregation/round_1_released_nothing" in huge_t, huge_t
    assert all("privacy-plan-invalid (privacy.distributed_dp.threshold)"
               in huge_t[f"refused/hospital_{k}"] for k in range(2)), huge_t
    assert "stopped_early" in huge_t
    # No hospital spent anything: no ledger has a step.
    for k in range(2):
        ledger = hospitals / f"partition-{k}" / "privacy-ledger.json"
        assert not ledger.exists() or all(
            not run["history"] for run in json.loads(ledger.read_text())["runs"])
    # Nothing from a record reached the server: its console, the SuperLink's log and
    # database, the MLflow store. (The hospitals' own logs keep the details.)
    assert CANARY not in output
    assert not _files_holding_canary(store)
    assert not _files_holding_canary(home, skip=(hospitals,))
    assert all("the server sent data.label_column='text'" in
               (hospitals / f"partition-{k}" / "hospital.log").read_text() for k in range(2))

"""Dependencies point one way (settings and protocol <- strategies <- tracking <- fl_app;
tasks knows no Flower; secure_aggregation is cryptography only; serving needs no Flower), and
each package holds what its name says."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(package):
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield path, [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, [node.module]


@pytest.mark.parametrize("package,forbidden", [
    ("tasks", ("flwr", "fl_app", "strategies")),
    ("strategies", ("transformers", "peft", "opacus", "tasks", "fl_app", "torch", "tracking")),
    ("tracking", ("transformers", "peft", "opacus", "tasks", "fl_app", "torch")),
    ("protocol", ("flwr", "transformers", "peft", "opacus", "torch", "tasks", "fl_app",
                  "strategies", "tracking", "settings")),
    ("secure_aggregation", ("transformers", "peft", "opacus", "torch", "tasks", "fl_app",
                            "strategies", "tracking", "settings", "protocol")),
    ("serving", ("flwr", "opacus", "fl_app", "strategies", "secure_aggregation")),
    ("settings", ("flwr", "transformers", "peft", "opacus", "torch", "tasks", "fl_app",
                  "strategies", "tracking", "protocol")),
])
def test_dependencies_point_one_way(package, forbidden):
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path, names in _imports(package) for name in names
                 if name.split(".")[0] in forbidden]
    assert not offenders, offenders


def test_the_default_config_ships_in_the_flower_bundle_and_results_do_not():
    ignored = (ROOT / ".gitignore").read_text()
    assert "mlruns/*" in ignored and "outputs/" in ignored
    assert (ROOT / "conf" / "config.yaml").is_file()


def test_the_flower_bundle_holds_the_app_and_not_its_tests_benchmarks_or_docs():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    top = {name.split("/")[0] for name in names}
    assert {"fl_app", "tasks", "conf", "settings", "pyproject.toml"} <= top
    assert not top & {"tests", "benchmarks", "docs", "mlruns", ".flwr"}, top


@pytest.mark.parametrize("question,answer", [
    ("where is epsilon computed", "tasks/privacy/accounting.py"),
    ("where is DP-SGD run", "tasks/privacy/dp_sgd.py"),
    ("where is aggregation done", "strategies/registry.py"),
    ("where are metrics combined", "strategies/metric_rules.py"),
    ("where is data partitioned", "tasks/data/partitions.py"),
    ("where is the model built", "tasks/model/build.py"),
    ("where is a hospital trained", "tasks/learning/training.py"),
    ("where are GPU and bf16 chosen", "tasks/model/compute.py"),
    ("what do server and hospitals send", "protocol/messages.py"),
    ("where is SecAgg+ done", "secure_aggregation/secagg_plus.py"),
    ("where is CKKS done", "secure_aggregation/ckks.py"),
    ("where do results go to MLflow", "tracking/round_log.py"),
    ("where are the settings and their defaults", "settings/task.py"),
    ("where is the prediction service", "serving/app.py"),
    ("where is encrypted inference done", "serving/ckks_head.py"),
    ("where is a crashed run resumed", "fl_app/resume.py"),
    ("where are updates checked before aggregation", "strategies/update_check.py"),
    ("what does the server checkpoint", "strategies/checkpoint.py"),
    ("what may a hospital say when it refuses", "protocol/refusals.py"),
    ("what does a hospital check in a message", "fl_app/received.py"),
    ("whose data mapping holds", "tasks/data/mapping.py"),
])
def test_a_newcomer_finds_things_by_their_names(question, answer):
    assert (ROOT / answer).is_file(), question


def test_strategies_hold_aggregation_only():
    held = {p.stem for p in (ROOT / "strategies").glob("*.py")} - {"__init__"}
    assert held <= {"registry", "central_dp", "privacy_budget", "metric_rules", "wrapper",
                    "update_recorder", "evaluation_schedule", "update_check", "checkpoint",
                    "strategy_state", "round_offset", "class_wise_head",
                    "learning_rate_schedule"}, held


def test_every_top_level_package_is_installed():
    """A package missing from pyproject's list imports from the checkout, but not from the
    console scripts (clinical-fl) or the Flower app bundle."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert {f"{name}*" for name in packages} <= set(listed), (packages, listed)

"""Dependencies point one way (settings and protocol <- strategies <- tracking <- fl_app;
tasks knows no Flower; secure_aggregation is cryptography only; serving needs no Flower),
hospital and server code never import each other, and each package holds what its name says."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NS = "clinical_fl"
ML = ("transformers", "peft", "opacus", "torch")


def _imports(package):
    where = ROOT / package
    for path in [where] if where.is_file() else where.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield path, [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                yield path, ["<relative import>"]


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _ns(*names):
    return tuple(f"{NS}.{name}" for name in names)


@pytest.mark.parametrize("package,forbidden", [
    ("tasks", ("flwr", "fl_app", "strategies", *_ns("tracking", "serving"))),
    ("strategies", (*ML, "tasks", "fl_app", *_ns("tracking", "serving"))),
    (f"{NS}/tracking", (*ML, "tasks", "fl_app", *_ns("serving"))),
    (f"{NS}/protocol", ("flwr", *ML, "tasks", "fl_app", "strategies",
                        *_ns("tracking", "settings", "serving", "secure_aggregation"))),
    (f"{NS}/secure_aggregation", (*ML, "tasks", "fl_app", "strategies",
                                  *_ns("tracking", "settings", "protocol", "serving"))),
    (f"{NS}/serving", ("flwr", "opacus", "fl_app", "strategies", *_ns("secure_aggregation"))),
    (f"{NS}/settings", ("flwr", *ML, "tasks", "fl_app", "strategies",
                        *_ns("tracking", "protocol", "serving", "secure_aggregation"))),
    # The trust boundary in the tree: what runs in a hospital never imports the coordinator's
    # code, nor the coordinator the hospital's; both may use fl_app/exchange.py and console.py.
    ("fl_app/hospital", ("fl_app.server", "fl_app.commands", *_ns("tracking", "serving"))),
    ("fl_app/server", ("fl_app.hospital", "fl_app.commands")),
    ("fl_app/commands", ("fl_app.hospital",)),
    ("fl_app/exchange.py", ("fl_app.hospital", "fl_app.server", "fl_app.commands")),
])
def test_dependencies_point_one_way(package, forbidden):
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path, names in _imports(package) for name in names
                 if _within(name, forbidden) or name == "<relative import>"]
    assert not offenders, offenders


def test_the_product_puts_no_generic_names_at_the_top_of_site_packages():
    top = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert top == {"fl_app", "strategies", "tasks", NS}, top


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
    assert {"fl_app", "tasks", "conf", NS, "pyproject.toml"} <= top
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
    ("what do server and hospitals send", "clinical_fl/protocol/messages.py"),
    ("where is SecAgg+ done", "clinical_fl/secure_aggregation/secagg_plus.py"),
    ("where is CKKS done", "clinical_fl/secure_aggregation/ckks.py"),
    ("where do results go to MLflow", "clinical_fl/tracking/round_log.py"),
    ("where are the settings and their defaults", "clinical_fl/settings/task.py"),
    ("where is the prediction service", "clinical_fl/serving/app.py"),
    ("where is encrypted inference done", "clinical_fl/serving/ckks_head.py"),
    ("where is a crashed run resumed", "fl_app/server/resume.py"),
    ("where are updates checked before aggregation", "strategies/update_check.py"),
    ("what does the server checkpoint", "strategies/checkpoint.py"),
    ("what may a hospital say when it refuses", "clinical_fl/protocol/refusals.py"),
    ("what does a hospital check in a message", "fl_app/hospital/received.py"),
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

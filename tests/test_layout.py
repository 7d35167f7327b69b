"""Dependencies point one way: tasks/ knows no Flower, strategies/ knows no transformers/PEFT."""

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
    ("strategies", ("transformers", "peft", "opacus", "tasks", "fl_app", "torch")),
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

"""Check the ``--run-config`` of a ``flwr run`` command line before Flower sees it.

    python -m fl_app.commands.run_config_check [APP] [flwr run arguments...]
    python -m fl_app.commands.run_config_check --run-config 'num-server-rounds=6 privacy="dp_sgd"'

Flower refuses a key that ``[tool.flwr.app.config]`` lacks with ``[code: 15] Invalid run
configuration.``, naming nothing, and a bad value only fails once the simulation is up (tens
of seconds). This reads the ``--run-config``/``-c`` arguments exactly as ``flwr run`` does
(Flower's own ``parse_config_args``: ``k=v`` pairs, several per argument, TOML values, or one
``.toml`` file), then fails naming every unknown key with its near misses among the app's keys
(read from APP's pyproject.toml; APP is the first argument when it is a folder holding one,
else this project), every value of the wrong type, and anything the composed configuration
or its data refuses (``clinical_fl/settings/run_config.py``,
``fl_app/server/data_check.py``), in seconds. The other ``flwr run`` arguments are ignored; a
SUPERLINK connection name among them means a deployment, where the hospitals' data is theirs
to check.

Exit status 0: ``flwr run`` may go ahead; 1: the problems are printed as ``error: ...``;
2: the command line itself cannot be read.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import click
from flwr.common.config import flatten_dict, parse_config_args

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import did_you_mean, schema_keys, to_run_settings
from clinical_fl.settings.run_config import OVERRIDES_KEY, TYPED_KEYS, compose_run_config
from fl_app.server.data_check import check_data

PROJECT = Path(__file__).resolve().parents[2]
# flwr run's options that take a value (flwr/cli/run/run.py), so that a value is not taken
# for the APP or SUPERLINK argument.
_VALUED = {"--federation", "--federation-config", "--format"}
_RUN_CONFIG = ("--run-config", "-c")


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the ``--run-config`` values, the positional arguments) of ``flwr run``'s arguments."""
    values, positional = [], []
    args = iter(argv)
    for arg in args:
        if arg in _RUN_CONFIG:
            values.append(next(args, ""))
        elif arg.startswith("--run-config="):
            values.append(arg.partition("=")[2])
        elif arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
            values.append(arg[2:])
        elif arg in _VALUED:
            next(args, None)
        elif not arg.startswith("-"):
            positional.append(arg)
    return values, positional


def app_config(app: Path) -> dict[str, Any]:
    """The app's run config defaults, flattened as Flower flattens them."""
    with (app / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)
    return flatten_dict(project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _bad_pair(values: list[str]) -> str | None:
    """What is wrong with the first ``k=v`` pair of these arguments that is not TOML."""
    for value in values:
        for pair in value.split():
            try:
                parse_config_args([pair])
            except click.ClickException:
                key, _, raw = pair.partition("=")
                return (f"'{pair}' is not a TOML value: a string needs quotes, e.g. "
                        f"--run-config '{key}=\"{raw.strip(chr(39) + chr(34))}\"' (numbers "
                        "and true/false go bare)")
    return None


def unknown_key(key: str, known: dict[str, Any]) -> str:
    """What to say of a run-config key the app lacks: its near misses among the app's keys,
    the typed key of a Hydra setting given by its schema name, or the ``overrides`` key."""
    hydra = {k.setting: k.name for k in TYPED_KEYS}
    if key in hydra:
        hint = f" did you mean '{hydra[key]}' (the run-config key for {key})?"
    else:
        hint = did_you_mean(key, known) or did_you_mean(key.replace("_", "-"), known)
    if key in schema_keys() or key.split("=")[0] in schema_keys():
        hint += (f" Hydra settings go in the '{OVERRIDES_KEY}' key: "
                 f"--run-config \"{OVERRIDES_KEY}='{key}=...'\"")
    else:
        hint += (f" (any other setting of conf/ goes in '{OVERRIDES_KEY}', e.g. "
                 f"--run-config \"{OVERRIDES_KEY}='model.lora.r=16'\")")
    return (f"error: unknown run-config key '{key}';{hint} valid keys are "
            f"{sorted(known)}")


def check(argv: list[str]) -> list[str]:
    """The problems of a ``flwr run`` command line's run config (none: it may go ahead)."""
    values, positional = split_arguments(argv)
    app = PROJECT
    if positional and (Path(positional[0]) / "pyproject.toml").is_file():
        app = Path(positional[0])
        positional = positional[1:]
    known = app_config(app)
    try:
        given = parse_config_args(values or None)
    except click.ClickException as err:
        return [f"error: --run-config: {_bad_pair(values) or err.message}"]
    except (OSError, ValueError) as err:  # a .toml file missing, or mixed with pairs
        return [f"error: --run-config: {err}"]
    problems = [unknown_key(key, known) for key in given if key not in known]
    if problems:
        return problems
    try:
        _, cfg = compose_run_config({**known, **given})
        # A SUPERLINK argument: a deployment, whose hospitals read their own data.
        check_data(to_run_settings(cfg).data, hospitals_read_here=not positional)
    except ConfigError as err:
        return [f"error: {err}"]
    return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        problems = check(args)
    except (OSError, tomllib.TOMLDecodeError) as err:
        print(f"error: cannot read the app's pyproject.toml: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

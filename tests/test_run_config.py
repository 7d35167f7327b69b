"""The Flower run config: typed keys as Hydra overrides, their precedence, and the checker
``python -m fl_app.commands.run_config_check`` that names a bad key before ``flwr run`` does."""

import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from clinical_fl.settings.compose import ConfigError, compose_config, to_run_settings
from clinical_fl.settings.run_config import (
    TYPED_KEYS,
    compose_run_config,
    hydra_value,
    run_config_defaults,
    run_config_overrides,
)
from fl_app.commands.run_config_check import check, split_arguments

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = run_config_defaults()


def flower_run_config(*run_config: str) -> dict:
    """The run config the ServerApp gets for ``flwr run . --run-config ...``: Flower's own
    parser, then Flower's fusion with pyproject's defaults."""
    return get_fused_config_from_dir(ROOT, parse_config_args(list(run_config)))


def test_pyproject_holds_the_typed_keys_with_the_schemas_defaults():
    with (ROOT / "pyproject.toml").open("rb") as file:
        table = tomllib.load(file)["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS
    assert list(table)[:len(TYPED_KEYS)] == [key.name for key in TYPED_KEYS]
    # Each default is what the configuration has anyway, so leaving it out changes nothing.
    plain = to_run_settings(compose_config([]))
    assert plain.num_rounds == DEFAULTS["num-server-rounds"]
    assert plain.train.local_epochs == DEFAULTS["local-epochs"]
    assert plain.train.learning_rate == DEFAULTS["learning-rate"]
    assert plain.privacy.mechanism.value == DEFAULTS["privacy"] == "none"
    assert not plain.privacy.central_dp.enabled
    assert plain.strategy.name.value == DEFAULTS["strategy"]
    assert plain.secure_aggregation.mode.value == DEFAULTS["secure-aggregation"]
    assert plain.data.path is None and DEFAULTS["data-path"] == ""
    for privacy in ("dp_sgd", "distributed_dp"):  # the presets' target
        section = getattr(to_run_settings(compose_config([f"privacy={privacy}"])).privacy,
                          privacy)
        assert section.target_epsilon == DEFAULTS["target-epsilon"]


def test_the_defaults_and_the_overrides_key_alone_give_the_overrides_alone():
    assert run_config_overrides(flower_run_config()) == []
    assert run_config_overrides(flower_run_config(
        "overrides='num_rounds=5 strategy=fedprox'")) == ["num_rounds=5", "strategy=fedprox"]
    # What clinical-fl sends (a TOML file with the overrides key) still works.
    assert run_config_overrides({"overrides": "train.local_epochs=2"}) == [
        "train.local_epochs=2"]


@pytest.mark.parametrize("given,expected", [
    ("num-server-rounds=6", ["num_rounds=6"]),
    ("local-epochs=2", ["train.local_epochs=2"]),
    ("learning-rate=5e-4", ["train.learning_rate=0.0005"]),
    ('privacy="dp_sgd"', ["privacy=dp_sgd"]),
    ('privacy="dp_sgd" target-epsilon=3', ["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=3.0"]),
    ('privacy="dp_sgd" target-epsilon=inf',
     ["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf"]),
    ('privacy="distributed_dp" target-epsilon=3',
     ["privacy=distributed_dp", "privacy.distributed_dp.target_epsilon=3.0"]),
    ('strategy="fedprox"', ["strategy=fedprox"]),
    ('secure-aggregation="secagg_plus"', ["secure_aggregation=secagg_plus"]),
    ('data-path="/exports/part*.csv"', ["data=files", "data.path='/exports/part*.csv'"]),
    # The same value as the default sets nothing.
    ('num-server-rounds=4 strategy="fedavg"', []),
])
def test_each_typed_key_is_one_hydra_override(given, expected):
    assert run_config_overrides(flower_run_config(given)) == expected


def test_typed_keys_come_first_and_must_agree_with_the_overrides_key():
    run_config = flower_run_config('num-server-rounds=6 privacy="dp_sgd"',
                                   "overrides='model.lora.r=16 num_rounds=6'")
    assert run_config_overrides(run_config) == [
        "num_rounds=6", "privacy=dp_sgd", "model.lora.r=16", "num_rounds=6"]
    with pytest.raises(ConfigError, match=r"'num-server-rounds' sets num_rounds=6, and "
                                          r"'overrides' sets num_rounds=7: give it once"):
        run_config_overrides(flower_run_config("num-server-rounds=6",
                                               "overrides='num_rounds=7'"))
    with pytest.raises(ConfigError, match=r"'strategy' sets strategy=fedprox.*fedadam") as err:
        run_config_overrides(flower_run_config('strategy="fedprox"',
                                               "overrides='strategy=fedadam'"))
    assert err.value.key == "strategy"


def test_a_typed_key_left_at_its_default_lets_the_presets_choose():
    """privacy="dp_sgd" brings 3 local epochs; local-epochs=1 (the default) cannot be told
    from a key left alone, so the preset's 3 stand; an override sets 1."""
    _, cfg = compose_run_config(flower_run_config('privacy="dp_sgd"'))
    assert cfg.train.local_epochs == 3
    _, cfg = compose_run_config(flower_run_config('privacy="dp_sgd" local-epochs=1'))
    assert cfg.train.local_epochs == 3
    _, cfg = compose_run_config(flower_run_config(
        'privacy="dp_sgd"', "overrides='train.local_epochs=1'"))
    assert cfg.train.local_epochs == 1
    _, cfg = compose_run_config(flower_run_config('privacy="distributed_dp"'))
    assert cfg.strategy.name.value == "fedadam", "strategy's default leaves the preset's"
    assert cfg.secure_aggregation.mode.value == "secagg_plus"
    _, cfg = compose_run_config(flower_run_config('privacy="distributed_dp" '
                                                  'secure-aggregation="ckks" target-epsilon=2'))
    assert cfg.secure_aggregation.mode.value == "ckks"
    assert cfg.privacy.distributed_dp.target_epsilon == 2.0


@pytest.mark.parametrize("run_config,message,key", [
    ({"num-server-rounds": "6"}, r"'num-server-rounds': got '6' \(str\), expected an integer",
     "num_rounds"),
    ({"local-epochs": True}, r"'local-epochs': got True", "train.local_epochs"),
    ({"privacy": "dpsgd"}, r"'privacy': got 'dpsgd'; did you mean 'dp_sgd'\? valid options "
     r"are \['central_dp'", "privacy"),
    ({"num-server-rounds": 0}, r"num_rounds.*at least 1 \(set by the run config's "
     r"num-server-rounds=0\)", "num_rounds"),
    ({"target-epsilon": 3.0}, r"privacy=dp_sgd.*set by the run config's target-epsilon=3\.0",
     "privacy.dp_sgd.target_epsilon"),
    ({"overrides": "num-server-rounds=3"},
     r"unknown key 'num-server-rounds'.*a run-config key of its own", "num-server-rounds"),
])
def test_bad_typed_values_name_the_key(run_config, message, key):
    with pytest.raises(ConfigError, match=message) as err:
        compose_run_config({**DEFAULTS, **run_config})
    assert err.value.key == key


@pytest.mark.parametrize("path", ["/a b/c*.csv", "it's", "a\\b", "end\\", "x,y=z", "[1]"])
def test_a_data_path_reaches_the_settings_unchanged(path):
    assert compose_config(["data=files", f"data.path={hydra_value(path)}"]).data.path == path


def test_run_config_check_reads_the_arguments_as_flwr_run_does():
    assert split_arguments([".", "--stream", "--run-config", "a=1", "-c", "b=2", "-cc=3",
                            "--run-config=d=4", "--federation-config", "num-supernodes=3",
                            "my-superlink"]) == (["a=1", "b=2", "c=3", "d=4"],
                                                 [".", "my-superlink"])
    assert check([]) == []
    assert check(["--stream", "--run-config", 'num-server-rounds=6 privacy="dp_sgd"',
                  "--run-config", "target-epsilon=3 overrides='model.lora.r=16'"]) == []


@pytest.mark.parametrize("argument,message", [
    ("num_rounds=6", r"unknown run-config key 'num_rounds'; did you mean 'num-server-rounds' "
     r"\(the run-config key for num_rounds\)\? Hydra settings go in the 'overrides' key"),
    ("localepochs=2", r"unknown run-config key 'localepochs'; did you mean 'local-epochs'\?"),
    ("train.lora_r=16", r"unknown run-config key 'train\.lora_r'.*'overrides'"),
    ("privacy=dp_sgd", r"'privacy=dp_sgd' is not a TOML value: a string needs quotes, e\.g\. "
     r"--run-config 'privacy=\"dp_sgd\"'"),
    ("overrides='privacy=dpsgd'", r"did you mean 'dp_sgd'"),
    ('data-path="/nope/notes.csv"', r"invalid data at 'data\.path'.*no such file"),
])
def test_run_config_check_names_the_key(argument, message):
    problems = check(["--run-config", argument])
    assert problems and all(p.startswith("error: ") for p in problems)
    assert any(re.search(message, p) for p in problems), problems


def test_run_config_check_reads_a_toml_file_and_every_unknown_key(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('num-server-rounds = 2\nprivacy = "dp_sgd"\n')
    assert check(["--run-config", str(good)]) == []
    bad = tmp_path / "bad.toml"
    bad.write_text("num_rounds = 2\n[train]\nlocal_epochs = 2\n")
    problems = check(["--run-config", str(bad)])
    assert len(problems) == 2 and "'train.local_epochs'" in problems[1]
    assert "'local-epochs'" in problems[1]


def test_run_config_check_as_a_command():
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fl_app.commands.run_config_check", ".", "--stream",
                          "--run-config", "num_rounds=6"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 1 and "did you mean 'num-server-rounds'" in out.stderr
    assert "Traceback" not in out.stderr and time.monotonic() - started < 30
    ok = subprocess.run([sys.executable, "-m", "fl_app.commands.run_config_check", "--run-config",
                         "num-server-rounds=2"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("run_config,message,key", [
    ({"data-path": "/nope/notes.csv"}, r"invalid data at 'data\.path'", "data.path"),
    ({"num-server-rounds": 0}, r"set by the run config's num-server-rounds=0", "num_rounds"),
    ({"privacy": "dp_sgd", "overrides": "train.local_epochs=2", "local-epochs": 3},
     r"'local-epochs' sets train\.local_epochs=3, and 'overrides' sets train\.local_epochs=2",
     "train.local_epochs"),
])
def test_the_server_app_refuses_a_bad_run_config_before_any_hospital(run_config, message, key,
                                                                     tmp_path):
    """The ServerApp's first lines, as Flower calls them (pyproject's defaults fused in); no
    Grid: nothing may reach the hospitals, and no MLflow store is made."""
    from flwr.app import Context, RecordDict

    from fl_app.server import server_app

    run_config = dict(run_config)
    overrides = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db " + run_config.pop("overrides", "")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**DEFAULTS, **run_config, "overrides": overrides})
    with pytest.raises(ConfigError, match=message) as err:
        server_app.main(None, context)
    assert err.value.key == key
    assert not (tmp_path / "mlflow.db").exists()

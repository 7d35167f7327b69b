import pytest

from fl_app.config import (
    ConfigError,
    compose_config,
    parse_overrides,
    task_settings,
    task_settings_from_yaml,
    task_settings_to_yaml,
    to_run_settings,
)
from strategies.config import StrategyName
from tasks.config import Partitioning


def test_defaults_compose_and_validate():
    cfg = compose_config([])
    settings = to_run_settings(cfg)
    assert settings.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert settings.strategy.name == StrategyName.fedavg
    assert settings.data.partitioning == Partitioning.natural
    assert settings.data.seed == settings.seed


def test_overrides_from_the_flower_run_config_string():
    cfg = compose_config(parse_overrides("train.local_epochs=2 model.lora.r=16 strategy=fedprox"))
    assert cfg.train.local_epochs == 2 and cfg.model.lora.r == 16
    assert cfg.strategy.name == StrategyName.fedprox and cfg.strategy.proximal_mu == 0.1


@pytest.mark.parametrize("name", [s.value for s in StrategyName])
def test_every_strategy_option_composes(name):
    assert compose_config([f"strategy={name}"]).strategy.name.value == name


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epochs'.*local_epochs"):
        compose_config(["train.epochs=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.local_epochs.*'two'"):
        compose_config(["train.local_epochs=two"])


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match=r"strategy/fedsgd(.|\n)*fedavg(.|\n)*krum"):
        compose_config(["strategy=fedsgd"])


def test_invalid_enum_value_lists_the_choices():
    with pytest.raises(ConfigError, match=r"strategy\.name.*expected one of"):
        compose_config(["strategy.name=fedsgd"])


@pytest.mark.parametrize("override,key", [
    ("num_rounds=0", "num_rounds"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("data.labels=[cardiology]", "data.labels"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config([override])


def test_task_settings_round_trip_through_the_message_yaml():
    cfg = compose_config(["model.lora.r=4"])
    task = task_settings(cfg, ["a", "b"])
    again = task_settings_from_yaml(task_settings_to_yaml(task))
    assert again == task and again.data.labels == ["a", "b"]


def test_hospital_rejects_settings_with_a_wrong_type():
    yaml = task_settings_to_yaml(task_settings(compose_config([]), ["a", "b"]))
    with pytest.raises(ConfigError):
        task_settings_from_yaml(yaml.replace("local_epochs: 1", "local_epochs: many"))

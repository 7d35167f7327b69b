import pytest

from settings.compose import (
    ConfigError,
    compose_config,
    parse_overrides,
    task_settings,
    task_settings_from_yaml,
    task_settings_to_yaml,
    to_run_settings,
)
from settings.run import RunSettings
from settings.strategy import StrategyName, StrategySettings
from settings.task import (
    DataSettings,
    DataSource,
    DpSgdSettings,
    Partitioning,
    TaskSettings,
    TrainSettings,
)


def test_defaults_compose_and_validate():
    cfg = compose_config([])
    settings = to_run_settings(cfg)
    assert settings.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert settings.strategy.name == StrategyName.fedavg
    assert settings.data.partitioning_used() == Partitioning.natural
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
    ("train.head_learning_rate=0", "train.head_learning_rate"),
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


@pytest.mark.parametrize("overrides,message", [
    (["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=0"],
     r"privacy\.dp_sgd\.target_epsilon': got 0\.0, expected > 0"),
    (["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=-3"], r"target_epsilon': got -3\.0"),
    (["privacy=dp_sgd", "privacy.dp_sgd.target_delta=1.5"],
     r"privacy\.dp_sgd\.target_delta': got 1\.5, expected in \(0, 1\)"),
    (["privacy=dp_sgd", "privacy.dp_sgd.target_delta=0"], r"target_delta': got 0\.0"),
    (["privacy=dp_sgd", "privacy.dp_sgd.noise_multiplier=1.0"],
     r"give exactly one of target_epsilon \(got 8\.0\) and noise_multiplier \(got 1\.0\)"),
    (["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=null"], r"give exactly one of"),
    (["privacy=dp_sgd", "privacy.dp_sgd.max_epsilon=0"], r"privacy\.dp_sgd\.max_epsilon"),
    (["privacy=dp_sgd", "strategy=fedprox", "strategy.proximal_mu=0.1"],
     r"strategy\.proximal_mu.*FedProx"),
    (["privacy=central_dp", "strategy=fedadam"], r"strategy\.name.*fedavg"),
    (["privacy=central_dp", "strategy.fraction_train=0.5"], r"strategy\.fraction_train"),
    (["privacy=central_dp", "privacy.central_dp.noise_multiplier=0"],
     r"privacy\.central_dp\.noise_multiplier"),
    (["privacy=dp_sgd", "privacy.dp_sgd.accountant=gdp"], r"accountant.*expected one of"),
])
def test_bad_privacy_settings_fail_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_privacy_options_compose():
    both = compose_config(["privacy=dp_sgd_central_dp", "privacy.dp_sgd.target_epsilon=3"])
    assert both.privacy.dp_sgd.enabled and both.privacy.central_dp.enabled
    assert both.privacy.dp_sgd.target_epsilon == 3.0
    assert compose_config(["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf"]
                          ).privacy.dp_sgd.target_epsilon == float("inf")
    assert not compose_config([]).privacy.dp_sgd.enabled


def test_dp_sgd_brings_its_training_recipe_and_the_command_line_still_wins():
    assert compose_config([]).train.local_epochs == 1
    for privacy in ("dp_sgd", "dp_sgd_central_dp"):
        assert compose_config([f"privacy={privacy}"]).train.local_epochs == 3
    assert compose_config(["+sweep=epsilon"]).train.local_epochs == 3, "every sweep level alike"
    assert compose_config(["privacy=dp_sgd", "train.local_epochs=1"]).train.local_epochs == 1
    assert compose_config(["privacy=central_dp"]).train.local_epochs == 1


def test_the_composed_default_config_is_the_dataclass_defaults():
    """One set of defaults: conf/ adds nothing to the schema unless a preset is chosen."""
    assert to_run_settings(compose_config([])) == RunSettings()
    fedavgm = to_run_settings(compose_config(["strategy=fedavgm"])).strategy
    assert fedavgm == StrategySettings(name=StrategyName.fedavgm)


def test_settings_built_by_hand_check_themselves():
    with pytest.raises(ConfigError, match=r"'train\.learning_rate': got -1, expected greater"):
        TrainSettings(learning_rate=-1)
    with pytest.raises(ConfigError, match=r"'data\.partitioning': got 'bogus', expected one of"):
        DataSettings(partitioning="bogus")
    with pytest.raises(ConfigError, match=r"give exactly one of target_epsilon"):
        DpSgdSettings(enabled=True)
    with pytest.raises(ValueError, match=r"'strategy\.min_hospitals': got 0"):
        StrategySettings(min_hospitals=0)
    with pytest.raises(ConfigError, match=r"'data\.site_column'"):
        DataSettings(source=DataSource.files, path="x.csv", partitioning=Partitioning.natural)
    assert TaskSettings().train.head_learning_rate == 3e-2, "the product's defaults"


def test_partitioning_auto_follows_whether_the_source_names_sites():
    assert DataSettings().partitioning_used() == Partitioning.natural
    assert DataSettings(source="files", path="x.csv").partitioning_used() == Partitioning.iid
    assert DataSettings(source="files", path="x.csv", site_column="site"
                        ).partitioning_used() == Partitioning.natural
    # The schema's default stays auto, whatever source a preset then picks.
    assert compose_config(["data=files", "data.labels=[a,b]"]).data.partitioning.value == "auto"


def test_one_switch_for_dp_sgd_and_the_sweeps_inf_level_turns_it_off():
    private = compose_config(["privacy=dp_sgd"]).privacy.dp_sgd
    assert private.enabled and private.target_epsilon == 8.0
    level = compose_config(["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf"])
    assert not level.privacy.dp_sgd.enabled, "hospitals read enabled, never epsilon"
    assert task_settings(level, ["a", "b"]).privacy.dp_sgd.enabled is False

import dataclasses
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clinical_fl.settings.compose import (
    ConfigError,
    check_override_keys,
    compose_config,
    parse_overrides,
    task_settings,
    task_settings_from_yaml,
    task_settings_to_yaml,
    to_run_settings,
    validate_config,
)
from clinical_fl.settings.data import DataSettings, DataSource, Partitioning
from clinical_fl.settings.model import LoraSettings
from clinical_fl.settings.privacy import DistributedDpSettings, DpSgdSettings, PrivacySettings
from clinical_fl.settings.run import RunSettings
from clinical_fl.settings.secure_aggregation import SecureAggregationSettings
from clinical_fl.settings.strategy import CentralDpSettings, StrategyName, StrategySettings
from clinical_fl.settings.task import TaskSettings
from clinical_fl.settings.train import TrainSettings


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
    with pytest.raises(ConfigError, match=r"valid keys in 'train' are .*; did you mean "
                                          r"'train\.local_epochs'\?$"):
        compose_config(["train.epochs=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.nope'; valid keys in 'model' "
                                          r"are \['chunk_stride', .*'window_pooling'\]$"):
        compose_config(["model=custom", "model.nope=1"])


def test_a_key_the_schema_lacks_in_a_composed_config_is_named_with_its_near_misses():
    """A preset (or a config built by hand) with a key the schema lacks: the same message as
    for an override, not OmegaConf's 'Key not in ModelSettings'."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose_config([])))
    cfg.model.max_lenght = 128
    with pytest.raises(ConfigError, match=r"unknown key 'model\.max_lenght'; valid keys in "
                                          r"'model' are .*did you mean 'model\.max_length'\?"):
        validate_config(cfg)
    # A hospital given a key its schema lacks (a server of another version) logs the same.
    yaml = task_settings_to_yaml(task_settings(compose_config([]), ["a", "b"]))
    with pytest.raises(ConfigError, match=r"unknown key 'train\.local_epoch';.*did you mean "
                                          r"'train\.local_epochs'\?") as err:
        task_settings_from_yaml(yaml.replace("local_epochs: 1", "local_epochs: 1\n  "
                                                                "local_epoch: 2"))
    assert err.value.key == "train.local_epoch"


@pytest.mark.parametrize("override,message,key", [
    ("privacy=dpsgd", r"did you mean 'dp_sgd'\? valid options are \['central_dp'", "privacy"),
    ("secure_aggregation=secagg", r"did you mean 'secagg_plus'\?", "secure_aggregation"),
    ("data=file", r"did you mean 'files'\? valid options are \['files', 'synthetic'",
     "data"),
    ("+sweep=eps", r"valid options are \['epsilon'\]", "sweep"),
    ("privacy=dp_sgd,nope", r"chooses 'nope'", "privacy"),
])
def test_an_unknown_group_option_names_the_near_misses_and_the_options(override, message, key):
    with pytest.raises(ConfigError, match=message) as err:
        compose_config([override])
    assert err.value.key == key


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
     r"privacy\.dp_sgd\.target_epsilon': got 0\.0, expected greater than 0"),
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
    assert (both.privacy.mechanism.value == "dp_sgd") and both.privacy.central_dp.enabled
    assert both.privacy.dp_sgd.target_epsilon == 3.0
    assert compose_config(["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf"]
                          ).privacy.dp_sgd.target_epsilon == float("inf")
    assert not (compose_config([]).privacy.mechanism.value == "dp_sgd")


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
        PrivacySettings(mechanism="dp_sgd")
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
    private = compose_config(["privacy=dp_sgd"]).privacy
    assert private.mechanism.value == "dp_sgd" and private.dp_sgd.target_epsilon == 8.0
    level = compose_config(["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf"])
    assert level.privacy.mechanism.value == "none", "hospitals read the mechanism, never epsilon"
    assert task_settings(level, ["a", "b"]).privacy.mechanism.value == "none"


# --- The hospital checks everything it receives -------------------------------------------
# A hospital parses the server's settings with these dataclasses, so every check below
# protects it as well as catching the operator's typos.

DP_SGD = ["privacy=dp_sgd"]
DP_SGD_BY_NOISE = ["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=null"]
DISTRIBUTED = ["privacy=distributed_dp"]
CENTRAL = ["privacy=central_dp"]
SECAGG = ["secure_aggregation=secagg_plus"]


def _bad(switch, key, *values):
    return [pytest.param(switch, key, value, id=f"{key}={value}") for value in values]


BAD_VALUES = [
    *_bad([], "train.learning_rate", "nan", "inf", "-inf", "-1", "0"),
    *_bad([], "train.head_learning_rate", "nan", "inf", "-1", "0"),
    *_bad([], "train.weight_decay", "nan", "inf", "-inf", "-1"),
    *_bad([], "train.max_grad_norm", "nan", "inf", "-1"),
    *_bad([], "train.local_epochs", "-1", "0", "101"),
    *_bad([], "train.batch_size", "-1", "0", "100001"),
    *_bad([], "train.eval_batch_size", "0", "100001"),
    *_bad([], "model.lora.r", "-1", "0", "1025"),
    *_bad([], "model.lora.alpha", "-1", "0"),
    *_bad([], "model.lora.dropout", "nan", "inf", "-inf", "-0.1", "1"),
    *_bad([], "model.max_length", "-1", "0", "7", "100001"),
    *_bad([], "model.max_chunks", "-1", "0", "10001"),
    *_bad([], "audit.canary_norm", "nan", "inf", "-1", "0"),
    # inf is the sweep's level without DP-SGD (tested below), -inf is not.
    *_bad(DP_SGD, "privacy.dp_sgd.target_epsilon", "nan", "-inf", "-1", "0"),
    *_bad(DP_SGD_BY_NOISE, "privacy.dp_sgd.noise_multiplier", "nan", "inf", "-1", "0"),
    *_bad(DP_SGD, "privacy.dp_sgd.target_delta", "nan", "inf", "-1", "0", "1"),
    *_bad(DP_SGD, "privacy.dp_sgd.max_grad_norm", "nan", "inf", "-1", "0"),
    *_bad(DP_SGD, "privacy.dp_sgd.max_epsilon", "nan", "inf", "-1", "0"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.target_epsilon", "nan", "-inf", "-1", "0"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.noise_multiplier", "nan", "inf", "-1", "0"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.target_delta", "nan", "inf", "-1", "0", "1"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.max_grad_norm", "nan", "inf", "-1", "0"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.max_epsilon", "nan", "inf", "-1", "0"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.expected_batch_size", "-1", "0", "1000001"),
    # Set by the server for the hospitals.
    *_bad(DISTRIBUTED, "privacy.distributed_dp.sample_rate", "nan", "inf", "-1", "0", "1.5"),
    *_bad(DISTRIBUTED, "privacy.distributed_dp.threshold", "-1", "0", "1", "10001"),
    *_bad(CENTRAL, "privacy.central_dp.noise_multiplier", "nan", "inf", "-1", "0"),
    *_bad(CENTRAL, "privacy.central_dp.clipping_norm", "nan", "inf", "-1", "0"),
    *_bad(CENTRAL, "privacy.central_dp.target_delta", "nan", "inf", "0", "1"),
    *_bad(CENTRAL, "privacy.central_dp.max_epsilon", "nan", "inf", "-1", "0"),
    *_bad(SECAGG, "secure_aggregation.reconstruction_threshold", "-1", "0", "1", "10001"),
    *_bad(SECAGG, "secure_aggregation.num_shares", "-1", "1", "10001"),
    *_bad(SECAGG, "secure_aggregation.clipping_range", "nan", "inf", "-1", "0"),
    *_bad(SECAGG, "secure_aggregation.quantization_range", "1", str(2**30 + 1)),
]


@pytest.mark.parametrize("switch,key,value", BAD_VALUES)
def test_every_bad_number_fails_naming_the_full_key(switch, key, value):
    """NaN and infinities fail as well as values out of range (``nan > 0`` is False, but so
    is ``nan <= 0``): each check asks for a finite number first."""
    with pytest.raises(ConfigError, match=re.escape(f"'{key}': got ")) as err:
        compose_config([*switch, f"{key}={value}"])
    assert err.value.key == key


@pytest.mark.parametrize("settings,key", [
    (lambda: DistributedDpSettings(threshold=True),
     "privacy.distributed_dp.threshold"),
    (lambda: DistributedDpSettings(threshold=3.0),
     "privacy.distributed_dp.threshold"),
    (lambda: SecureAggregationSettings(mode="secagg_plus", reconstruction_threshold=True),
     "secure_aggregation.reconstruction_threshold"),
    (lambda: LoraSettings(r=8.5), "model.lora.r"),
    (lambda: LoraSettings(dropout=math.nan), "model.lora.dropout"),
    (lambda: TrainSettings(learning_rate=math.nan), "train.learning_rate"),
    (lambda: PrivacySettings(mechanism="dp_sgd", dp_sgd=DpSgdSettings(target_epsilon=-math.inf)),
     "privacy.dp_sgd.target_epsilon"),
    (lambda: CentralDpSettings(enabled=True, clipping_norm=math.inf),
     "privacy.central_dp.clipping_norm"),
])
def test_settings_built_by_hand_refuse_bools_fractions_and_nan(settings, key):
    """A bool is not an integer (``True`` would be a threshold of 1), nor is 3.0."""
    with pytest.raises(ConfigError) as err:
        settings()
    assert err.value.key == key


def test_the_hospital_refuses_nan_in_the_servers_plan_and_names_only_the_key():
    task = task_settings(compose_config(["privacy=distributed_dp"]), ["a", "b"])
    task.privacy.distributed_dp.sample_rate, task.privacy.distributed_dp.threshold = 0.5, 2
    yaml = task_settings_to_yaml(task)
    assert task_settings_from_yaml(yaml) == task
    with pytest.raises(ConfigError) as err:
        task_settings_from_yaml(yaml.replace("sample_rate: 0.5", "sample_rate: .nan"))
    assert err.value.key == "privacy.distributed_dp.sample_rate"
    with pytest.raises(ConfigError) as err:
        task_settings_from_yaml(yaml.replace("local_epochs: 1", "local_epochs: many"))
    assert err.value.key == "train.local_epochs"
    # A section the server left switched off, with a value in it.
    plain = task_settings_to_yaml(task_settings(compose_config([]), ["a", "b"]))
    assert "  distributed_dp:\n    target_epsilon: 8.0\n" in plain
    with pytest.raises(ConfigError) as err:
        task_settings_from_yaml(plain.replace("target_epsilon: 8.0", "target_epsilon: 3.0"))
    assert err.value.key == "privacy.distributed_dp.target_epsilon"


def test_the_sweeps_inf_level_still_switches_dp_off():
    for privacy in ("dp_sgd", "distributed_dp"):
        level = to_run_settings(compose_config([f"privacy={privacy}",
                                                f"privacy.{privacy}.target_epsilon=inf"]))
        assert level.privacy.mechanism.value == "none"
    # The level keeps the values of the sweep's private levels.
    level = compose_config(["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf",
                            "privacy.dp_sgd.max_grad_norm=0.5"])
    assert level.privacy.mechanism.value == "none" and level.privacy.dp_sgd.max_grad_norm == 0.5


# A value other than the default for every field of every section that has a switch.
SWITCHED_OFF = {
    "privacy=dp_sgd": [
        "privacy.dp_sgd.target_epsilon=3", "privacy.dp_sgd.target_delta=1e-6",
        "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_grad_norm=2",
        "privacy.dp_sgd.max_epsilon=5", "privacy.dp_sgd.accountant=prv",
        "privacy.dp_sgd.grad_sample_mode=functorch", "privacy.dp_sgd.target_epsilon=nan",
        "privacy.dp_sgd.label_count_noise=5"],
    "privacy=distributed_dp": [
        "privacy.distributed_dp.target_epsilon=3", "privacy.distributed_dp.noise_multiplier=1.0",
        "privacy.distributed_dp.target_delta=1e-6", "privacy.distributed_dp.max_grad_norm=2",
        "privacy.distributed_dp.expected_batch_size=32", "privacy.distributed_dp.max_epsilon=5",
        "privacy.distributed_dp.accountant=prv", "privacy.distributed_dp.sample_rate=0.5",
        "privacy.distributed_dp.threshold=3"],
    "privacy=central_dp": [
        "privacy.central_dp.noise_multiplier=0.5", "privacy.central_dp.clipping_norm=2",
        "privacy.central_dp.target_delta=1e-6", "privacy.central_dp.max_epsilon=5",
        "privacy.central_dp.noise_multiplier=nan"],
    "secure_aggregation=secagg_plus or secure_aggregation=ckks": [
        "secure_aggregation.reconstruction_threshold=3", "secure_aggregation.num_shares=3",
        "secure_aggregation.clipping_range=0.25", "secure_aggregation.quantization_range=1024",
        "secure_aggregation.ckks_public_context=/keys/ckks-public.ctx"],
}


@pytest.mark.parametrize("override,switch", [
    pytest.param(override, switch, id=override)
    for switch, overrides in SWITCHED_OFF.items() for override in overrides])
def test_a_setting_of_a_switched_off_mechanism_is_refused(override, switch):
    """``privacy.dp_sgd.target_epsilon=3`` without ``privacy=dp_sgd`` used to run without
    DP-SGD; now it names the key and the option that switches the mechanism on."""
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=re.escape(switch)) as err:
        compose_config([override])
    assert err.value.key == key
    # The same value with its mechanism on is accepted (nan excepted).
    if "nan" not in override:
        on = {"privacy=dp_sgd": DP_SGD_BY_NOISE if "noise_multiplier" in key else DP_SGD,
              "privacy=distributed_dp": DISTRIBUTED, "privacy=central_dp": CENTRAL}.get(
                  switch, ["secure_aggregation=ckks"] if "ckks" in key else SECAGG)
        compose_config([*on, override, "strategy.min_hospitals=3"])


def test_every_field_of_a_switched_off_section_is_covered():
    covered = {o.split("=", 1)[0] for overrides in SWITCHED_OFF.values() for o in overrides}
    for section, settings, switch in (
            ("privacy.dp_sgd", DpSgdSettings, None),
            ("privacy.distributed_dp", DistributedDpSettings, None),
            ("privacy.central_dp", CentralDpSettings, "enabled"),
            ("secure_aggregation", SecureAggregationSettings, "mode")):
        names = {f.name for f in dataclasses.fields(settings)} - {switch}
        assert {f"{section}.{name}" for name in names} <= covered, section


@pytest.mark.parametrize("overrides,key,switch", [
    (["privacy=dp_sgd", "privacy.distributed_dp.expected_batch_size=32"],
     "privacy.distributed_dp.expected_batch_size", "privacy=distributed_dp"),
    (["privacy=distributed_dp", "privacy.dp_sgd.target_epsilon=3"],
     "privacy.dp_sgd.target_epsilon", "privacy=dp_sgd"),
    (["privacy=dp_sgd", "privacy.distributed_dp.target_epsilon=3"],
     "privacy.distributed_dp.target_epsilon", "privacy=distributed_dp"),
    (["privacy=dp_sgd", "privacy.central_dp.clipping_norm=2"],
     "privacy.central_dp.clipping_norm", "privacy=central_dp"),
    (["privacy=central_dp", "privacy.dp_sgd.max_grad_norm=2"],
     "privacy.dp_sgd.max_grad_norm", "privacy=dp_sgd"),
    # A sweep of epsilon without DP: its levels would all run without it.
    (["+sweep=epsilon", "privacy=none", "privacy.dp_sgd.target_epsilon=3"],
     "privacy.dp_sgd.target_epsilon", "privacy=dp_sgd"),
])
def test_one_mechanism_on_does_not_let_anothers_settings_through(overrides, key, switch):
    with pytest.raises(ConfigError, match=re.escape(switch)) as err:
        compose_config(overrides)
    assert err.value.key == key


def test_a_non_private_audit_is_told_where_its_canary_norm_goes():
    with pytest.raises(ConfigError, match=r"set audit\.canary_norm"):
        compose_config(["privacy.dp_sgd.max_grad_norm=10"])
    assert compose_config(["audit.canary_norm=10"]).audit.canary_norm == 10


def test_secure_aggregation_refuses_the_other_modes_own_settings():
    """SecAgg+ has no CKKS context, CKKS no quantisation levels. The distributed DP preset's
    clipping_range stays valid under CKKS (the command line picks the mode)."""
    with pytest.raises(ConfigError, match="secure_aggregation=ckks") as err:
        compose_config(SECAGG + ["secure_aggregation.ckks_public_context=/keys/public.ctx"])
    assert err.value.key == "secure_aggregation.ckks_public_context"
    with pytest.raises(ConfigError, match="secure_aggregation=secagg_plus") as err:
        compose_config(["secure_aggregation=ckks", "secure_aggregation.quantization_range=1024"])
    assert err.value.key == "secure_aggregation.quantization_range"
    ckks = compose_config(["privacy=distributed_dp", "secure_aggregation=ckks"])
    assert ckks.secure_aggregation.clipping_range == 0.25


@pytest.mark.parametrize("privacy", ["dp_sgd", "distributed_dp", "dp_sgd_central_dp"])
@pytest.mark.parametrize("epsilon", ["1", "3", "8", "inf"])
def test_every_level_of_the_privacy_sweep_composes(privacy, epsilon):
    """conf/sweep/epsilon.yaml sweeps DP-SGD's target and gives distributed DP the same one:
    the mechanism that is off carries the target of the one that is on."""
    settings = to_run_settings(compose_config(["+sweep=epsilon", f"privacy={privacy}",
                                               f"privacy.dp_sgd.target_epsilon={epsilon}"]))
    on = settings.privacy.distributed_dp if privacy == "distributed_dp" else settings.privacy.dp_sgd
    assert (settings.privacy.mechanism.value != "none") == (epsilon != "inf")
    assert on.target_epsilon == float(epsilon)


def _presets():
    conf = Path(__file__).resolve().parent.parent / "conf"
    # What a preset needs from the command line to compose at all.
    needs = {"model=custom": ["model.name_or_path=/models/bert"],
             "data=files": ["data.labels=[a,b]"]}
    for path in sorted(conf.glob("*/*.yaml")):
        group = path.parent.name
        choice = f"+{group}={path.stem}" if group == "sweep" else f"{group}={path.stem}"
        yield pytest.param([choice, *needs.get(choice, [])], id=f"{group}/{path.name}")


@pytest.mark.parametrize("overrides", list(_presets()))
def test_every_preset_in_conf_composes(overrides):
    compose_config(overrides)


@pytest.mark.parametrize("privacy", ["none", "dp_sgd", "central_dp", "dp_sgd_central_dp",
                                     "distributed_dp"])
@pytest.mark.parametrize("secure", ["secagg_plus", "ckks"])
def test_every_privacy_preset_composes_with_every_secure_aggregation(privacy, secure):
    compose_config([f"privacy={privacy}", f"secure_aggregation={secure}"])


@pytest.mark.parametrize("settings", [DpSgdSettings, DistributedDpSettings, CentralDpSettings,
                                      SecureAggregationSettings])
def test_the_switch_an_error_names_is_a_preset_that_turns_it_on(settings):
    for option in settings.TURN_ON.split(" or "):
        group, _, choice = option.partition("=")
        assert (Path(__file__).resolve().parent.parent / "conf" / group / f"{choice}.yaml"
                ).is_file(), option
        run = to_run_settings(compose_config([option]))
        if group == "secure_aggregation":
            assert run.secure_aggregation.enabled, option
        elif settings is CentralDpSettings:
            assert run.privacy.central_dp.enabled, option
        else:
            assert run.privacy.mechanism == settings.MECHANISM, option


@pytest.mark.parametrize("override,key,message", [
    ("+train.lr=0.01", "train.lr",
     r"unknown key 'train\.lr' \('\+' adds a key.*valid keys in 'train' are .*'learning_rate'"),
    ("+train.learning_rate=0.01", "train.learning_rate", r"without the '\+'"),
    ("++train.lr=0.01", "train.lr", r"unknown key 'train\.lr'; valid keys in 'train'"),
    ("+foo=1", "foo", r"unknown key 'foo'.*valid keys at the top level are .*'num_rounds'"),
    ("+trian.lr=1", "trian", r"unknown key 'trian'; valid keys at the top level"),
    ("~train.learning_rate", "train.learning_rate", r"not a config group.*'sweep'"),
    ("~num_rounds", "num_rounds", r"would delete 'num_rounds'"),
    ("num_round=3", "num_round", r"unknown key 'num_round'; valid keys at the top level"),
])
def test_additions_and_deletions_of_schema_keys_are_refused(override, key, message):
    """``+train.lr=0.01`` used to be added by Hydra, then dropped by the schema without a word."""
    with pytest.raises(ConfigError, match=message) as err:
        compose_config([override])
    assert err.value.key == key


def test_group_additions_and_plain_overrides_still_compose():
    assert compose_config(["+sweep=epsilon"]).privacy.mechanism.value == "dp_sgd"
    # Hydra's own settings are Hydra's to check.
    check_override_keys(["hydra.sweep.dir=/tmp/x", "+hydra.job.chdir=true",
                         "hydra/launcher=basic"])
    assert compose_config(["++train.learning_rate=0.01"]).train.learning_rate == 0.01
    assert compose_config(["~privacy"]) == compose_config([])
    with pytest.raises(ConfigError) as err:
        compose_config(["train.local_epochs=two"])
    assert err.value.key == "train.local_epochs"

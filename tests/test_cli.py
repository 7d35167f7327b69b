import pytest
from flwr.common.config import parse_config_args

from fl_app.cli import flwr_run_command, write_run_config
from fl_app.flower_runs import started_run_id
from settings.compose import parse_overrides


@pytest.mark.parametrize("overrides", [
    ["train.local_epochs=2", "tracking.run_name='a b'"],
    ["tracking.uri=sqlite\\:////tmp/x/mlflow.db", "privacy.dp_sgd.target_epsilon=inf"],
    ['tracking.run_name="a b"', "+sweep=epsilon", "tracking.experiment='c d'"],
])
def test_hydra_overrides_reach_the_server_app_through_flowers_own_parser(overrides, tmp_path):
    command = flwr_run_command(write_run_config(overrides, tmp_path / "run.toml"))
    assert command[:2] == ["flwr", "run"] and "--stream" in command
    run_config = parse_config_args([command[command.index("--run-config") + 1]])
    # The ServerApp splits the string back into exactly the overrides Hydra received.
    assert parse_overrides(run_config["overrides"]) == overrides


def test_run_id_is_read_from_flwr_run_output():
    assert started_run_id("...\nSuccessfully started run 1234567\n...") == "1234567"
    assert started_run_id("Connection refused") is None

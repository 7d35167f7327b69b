import tomllib

from fl_app.cli import flwr_run_command
from fl_app.config import parse_overrides
from fl_app.flower_runs import started_run_id


def test_hydra_overrides_reach_flwr_run_as_one_valid_toml_value():
    command = flwr_run_command(["train.local_epochs=2", "tracking.run_name='a b'"])
    assert command[:2] == ["flwr", "run"] and "--stream" in command
    run_config = command[command.index("--run-config") + 1]
    overrides = tomllib.loads(run_config)["overrides"]
    # The ServerApp splits the string back into exactly the overrides Hydra received.
    assert parse_overrides(overrides) == ["train.local_epochs=2", "tracking.run_name='a b'"]


def test_run_id_is_read_from_flwr_run_output():
    assert started_run_id("...\nSuccessfully started run 1234567\n...") == "1234567"
    assert started_run_id("Connection refused") is None

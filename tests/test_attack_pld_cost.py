"""A server against the cost of PLD, the default accountant, through one hospital's real
ClientApp with a real ledger.

A one-step loss distribution is built per (noise, rate) and at most 16 are cached
(``tasks/privacy/accounting.py``); each costs 0.5 to 5 s at noise 0.2 to 0.5. A server that
ran the hospital through many short runs, each at its own noise (what calibration gives
anyway), leaves a lifetime ledger of more distinct (noise, rate) pairs than the cache holds: at
noise ~0.5 and rate 1e-3, 40 one-step runs spend epsilon ~3.4 (RDP), and every later reading
of the lifetime epsilon (each round's report) rebuilt all 40 (~24 s on this machine; 1,000
runs, still epsilon ~5: ~10 min a round). What must hold: a reading builds no loss
distribution of an earlier run beyond what the cache holds, and reports a figure no lower
than RDP's cross-check allows (RDP's own where PLD is not computed).
"""

from __future__ import annotations

import json

import pytest
from dp_accounting.pld import privacy_loss_distribution
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.privacy import Accountant
from fl_app.hospital.client_app import app
from tasks.privacy import accounting
from tasks.privacy.accounting import epsilon_spent
from tasks.privacy.ledger import LEDGER_FILE
from tests.hospital_process import initial_arrays
from tests.hostile_server import LABELS, task_identity, write_canary_export
from tests.support import task

NODE, RUN = 7, 44
DELTA = 1e-5
EARLIER = [(0.5 + 0.0001 * k, 1e-3, 1) for k in range(40)]  # 40 runs, one step each


@pytest.fixture(scope="module")
def identity():
    with task_identity(RUN, NODE):
        yield


def _earlier_runs(state) -> None:
    runs = [{"run_id": 1000 + k, "hospital": 0, "noise_multiplier": noise, "delta": DELTA,
             "history": [[noise, rate, steps]], "rounds_trained": [1], "accountants": ["pld"]}
            for k, (noise, rate, steps) in enumerate(EARLIER)]
    state.mkdir(parents=True)
    (state / LEDGER_FILE).write_text(json.dumps({
        "format": 3, "hospital": 0, "accountant": "pld", "neighbouring_relation": "zero_out",
        "runs": runs, "events": []}))


def test_attack_pld_many_earlier_runs_do_not_rebuild_every_distribution_each_round(
        tiny_bert, tmp_path, identity, monkeypatch):
    export = write_canary_export(tmp_path / "export" / "notes.csv", hospital=0)
    node_config = {"partition-id": 0, "data-path": str(export), "text-column": "text",
                   "label-column": "label", "deid": "allowed", "max-epsilon": 20.0,
                   "max-delta": DELTA, "state-dir": str(tmp_path / "state")}
    _earlier_runs(tmp_path / "state")
    settings = task(tiny_bert, "data=files", f"data.labels=[{','.join(LABELS)}]",
                    "train.batch_size=8", "train.local_epochs=1", "privacy=dp_sgd",
                    "privacy.dp_sgd.target_epsilon=2", labels=LABELS, planned_rounds=1)
    text = task_settings_to_yaml(settings)
    earlier_noises = {noise for noise, _, _ in EARLIER}
    built = []
    real = privacy_loss_distribution.from_gaussian_mechanism

    def counting(*args, **kwargs):
        if kwargs.get("standard_deviation") in earlier_noises:
            built.append(kwargs["standard_deviation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(privacy_loss_distribution, "from_gaussian_mechanism", counting)
    accounting._pld_of_one_step.cache_clear()
    accounting._pld_epsilon.cache_clear()
    msg = Message(RecordDict({m.CONFIG_RECORD: ConfigRecord({m.TASK_KEY: text,
                                                             m.SERVER_ROUND_KEY: 1}),
                              m.ARRAYS_RECORD: initial_arrays(text)}),
                  dst_node_id=NODE, message_type="train")
    context = Context(run_id=RUN, node_id=NODE, state=RecordDict(), run_config={},
                      node_config=node_config)
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason
    assert len(built) <= accounting._pld_of_one_step.cache_info().maxsize, (
        f"a round rebuilt {len(built)} loss distributions of earlier runs")
    # The figure reported: never below what the accountants allow over the whole history.
    lifetime = float(reply.content[m.METRICS_RECORD][m.LIFETIME_EPSILON])
    ledger = json.loads((tmp_path / "state" / LEDGER_FILE).read_text())
    history = [tuple(s) for run in ledger["runs"] for s in run["history"]]
    assert lifetime >= epsilon_spent(history, DELTA, Accountant.pld) - 1e-9
    assert lifetime <= epsilon_spent(history, DELTA, Accountant.rdp) + 1e-9

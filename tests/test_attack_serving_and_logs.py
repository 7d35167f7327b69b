"""Attacks on the recent serving, logging and run-config changes, through the real code paths.

- A hostile client of the prediction service (in process: the app ``create_app`` builds, and
  the app ``clinical-fl-serve`` hands to uvicorn wrapped as uvicorn wraps it): does a note, a
  token or a made-up text reach an error body, the access log, any other log line or
  ``/metrics``?
- A hostile or mistaken server against a hospital's real ClientApp (``app(msg, context)``):
  do the new training progress lines reach anything but ``hospital.log``; can a run config
  (typed keys, ``overrides``) loosen a hospital's policy?
- A hostile SuperLink against ``ProgressGrid``: lost pushes, silence, replies twice.

Three findings were fixed with these tests: a forged X-Forwarded-For choosing the client id
(uvicorn's proxy headers are off), header values echoed in encrypted-prediction errors, and a
note with a lone surrogate answered with a 500 instead of a 422.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.logger import FLOWER_LOGGER

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import is_refusal_line
from clinical_fl.serving import cli as serve_cli
from clinical_fl.serving import wire
from clinical_fl.serving.access_log import ACCESS_LOGGER, METHODS
from clinical_fl.serving.app import ServiceSettings, create_app
from clinical_fl.settings.compose import task_settings, task_settings_to_yaml
from clinical_fl.settings.data import DeidSettings
from clinical_fl.settings.model import ModelSettings
from clinical_fl.settings.run_config import compose_run_config, run_config_defaults
from fl_app.hospital.client_app import app as hospital_app
from fl_app.hospital.edge import HOSPITAL_LOG
from fl_app.server.grids import progress as progress_grid
from fl_app.server.grids.progress import ProgressGrid
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.learning.progress import TrainingProgress
from tasks.model.build import build_model, save_adapter
from tasks.model.predict import NoteClassifier
from tests.hospital_process import initial_arrays
from tests.hostile_server import CANARY, LABELS, holds_canary, write_canary_export
from tests.support import FAST, NO_DEID
from tests.support import task as compose_task

TOKEN = "attack-token-" + "5" * 40
OTHER_TOKEN = "other-token-" + "6" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOTE = f"{CANARY}note Zanzibar quokka xylophonist, MRN 12345678"  # no line may hold it
WORDS = (CANARY, "quokka", "xylophonist", TOKEN, "12345678")


# -- the prediction service, in process ---------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_random_bert, tmp_path_factory) -> Path:
    settings = ModelSettings(name_or_path=str(tiny_random_bert), max_length=64)
    model = build_model(settings, list(SPECIALTIES), seed=0)
    return save_adapter(model, tmp_path_factory.mktemp("attack-adapter"), settings,
                        list(SPECIALTIES), DeidSettings())


@pytest.fixture(scope="module")
def classifier(adapter) -> NoteClassifier:
    return NoteClassifier(adapter)


class _Everything(logging.Handler):
    """Every record of every logger that reaches the root, and the access logger's own."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(("httpx", "httpcore")):  # the test's own client
            self.records.append(record)

    def text(self) -> str:
        parts = []
        for record in self.records:
            parts.append(record.getMessage())
            if record.exc_info:
                parts.append(logging.Formatter().formatException(record.exc_info))
        return "\n".join(parts)

    def access_lines(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == ACCESS_LOGGER]


@pytest.fixture
def logs():
    handler = _Everything()
    root, access = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    levels = root.level, access.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    access.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        access.setLevel(levels[1])


@pytest.fixture(scope="module")
def service(classifier):
    """Tokens, /metrics on, a generous rate limit: every hostile request gets as far as it can."""
    settings = ServiceSettings(tokens=frozenset({TOKEN, OTHER_TOKEN}), metrics=True,
                               rate_limit_per_minute=100_000)
    app = create_app(classifier, settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.1)
        yield client


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


# (id, method, path, headers, body, content type): requests a hostile or careless client sends
HOSTILE = [
    ("note-in-path", "GET", f"/predict/{NOTE}", AUTH, None, None),
    ("note-in-path-no-token", "POST", f"/{NOTE}", {}, _json({"notes": [NOTE]}),
     "application/json"),
    ("note-in-query", "POST", f"/predict?note={NOTE}", AUTH, _json({"notes": ["cough"]}),
     "application/json"),
    ("note-in-query-405", "DELETE", f"/predict?note={NOTE}", AUTH, None, None),
    ("note-as-key", "POST", "/predict", AUTH, _json({NOTE: ["cough"]}), "application/json"),
    ("note-as-nested-key", "POST", "/predict", AUTH, _json({"notes": {NOTE: "x"}}),
     "application/json"),
    ("note-in-a-dict", "POST", "/predict", AUTH, _json({"notes": ["a", {NOTE: 1}]}),
     "application/json"),
    ("note-in-a-list", "POST", "/predict", AUTH, _json({"notes": [[NOTE]]}),
     "application/json"),
    ("note-as-number-key", "POST", "/predict", AUTH, _json({"notes": 7, NOTE: NOTE}),
     "application/json"),
    ("malformed-json", "POST", "/predict", AUTH, ('{"notes": ["' + NOTE + '"').encode(),
     "application/json"),
    ("malformed-json-after-note", "POST", "/predict", AUTH,
     ('{"notes": ["' + NOTE + '"] ' + NOTE).encode(), "application/json"),
    ("latin-1-bytes", "POST", "/predict", AUTH, ('{"notes": ["' + NOTE + ' \xe9"]}')
     .encode("latin-1"), "application/json"),
    ("text-plain", "POST", "/predict", AUTH, _json({"notes": [NOTE]}), "text/plain"),
    ("form", "POST", "/predict", AUTH, f"notes={NOTE}".encode(),
     "application/x-www-form-urlencoded"),
    ("multipart", "POST", "/predict", AUTH, _json({"notes": [NOTE]}),
     "multipart/form-data; boundary=x"),
    ("json-subtype", "POST", "/predict", AUTH, _json({"notes": [NOTE]}),
     "application/problem+json"),
    ("no-content-type", "POST", "/predict", AUTH, _json({"notes": [NOTE]}), None),
    ("unicode-note", "POST", "/predict", AUTH,
     _json({"notes": [NOTE + " \u202e\u0000\U0001f600 " + "é" * 1000]}), "application/json"),
    ("note-too-long", "POST", "/predict", AUTH, _json({"notes": [NOTE * 5000]}),
     "application/json"),
    ("body-too-large", "POST", "/predict", AUTH, _json({"notes": [NOTE] * 80_000}),
     "application/json"),
    ("too-many-notes", "POST", "/predict", AUTH, _json({"notes": [NOTE] * 300}),
     "application/json"),
    ("empty-note", "POST", "/predict", AUTH, _json({"notes": [NOTE, " "]}), "application/json"),
    ("note-as-token", "POST", "/predict", {"Authorization": f"Bearer {NOTE}"},
     _json({"notes": [NOTE]}), "application/json"),
    ("note-as-basic-auth", "GET", "/model", {"Authorization": f"Basic {NOTE}"}, None, None),
    ("token-in-path", "GET", f"/model/{TOKEN}", AUTH, None, None),
    ("token-as-path", "GET", f"/{TOKEN}", {}, None, None),
    ("token-in-query", "GET", f"/model?token={TOKEN}", {}, None, None),
    ("note-as-method", "QUOKKA", "/predict", AUTH, None, None),
    ("encrypted-garbage", "POST", "/encrypted/predict", AUTH, NOTE.encode() * 10,
     wire.MEDIA_TYPE),
    ("encrypted-header-not-json", "POST", "/encrypted/predict", AUTH,
     b"CFL1" + (len(NOTE) + 12).to_bytes(4, "big") + ('{"notes": "' + NOTE).encode() + b"x",
     wire.MEDIA_TYPE),
    ("encrypted-header-not-utf8", "POST", "/encrypted/predict", AUTH,
     b"CFL1" + (len(NOTE) + 1).to_bytes(4, "big") + b"\xff" + NOTE.encode(), wire.MEDIA_TYPE),
    ("encrypted-note-as-header-key", "POST", "/encrypted/predict", AUTH,
     wire.pack({NOTE: NOTE, "notes": 1}, [NOTE.encode()]), wire.MEDIA_TYPE),
    ("encrypted-note-as-ciphertext", "POST", "/encrypted/predict", AUTH,
     wire.pack({"notes": 1, "key_id": NOTE}, [NOTE.encode()] * 3), wire.MEDIA_TYPE),
    ("encrypted-note-as-keys", "POST", "/encrypted/keys", AUTH, NOTE.encode() * 50,
     "application/octet-stream"),
    ("encrypted-keys-no-token", "POST", "/encrypted/keys", {}, NOTE.encode(),
     "application/octet-stream"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_attack_no_hostile_request_puts_a_note_or_token_in_an_answer_or_a_log(
        service, logs, case):
    _name, method, path, headers, body, content_type = case
    headers = dict(headers) | ({"content-type": content_type} if content_type else {})
    response = service.request(method, path, headers=headers, content=body)
    answer = response.text + json.dumps(dict(response.headers))
    assert not any(word in answer for word in WORDS), answer[:500]
    if response.status_code >= 400:
        error = response.json()
        assert set(error) == {"detail", "code"} and isinstance(error["detail"], str), error
    lines = logs.access_lines()
    assert len(lines) == 1, lines  # one line per request, whatever it was
    assert not any(word in logs.text() for word in WORDS), logs.text()[-2000:]
    metrics = service.get("/metrics", headers=AUTH).text
    assert not any(word in metrics for word in WORDS)


def test_attack_every_access_line_has_the_fixed_fields_and_only_known_values(
        service, logs, classifier):
    routes = {r.path for r in service.app.routes} | {"unknown"}
    fingerprints = {f"token:{hashlib.sha256(t.encode()).hexdigest()[:16]}"
                    for t in (TOKEN, OTHER_TOKEN)}
    for _name, method, path, headers, body, content_type in HOSTILE:
        headers = dict(headers) | ({"content-type": content_type} if content_type else {})
        service.request(method, path, headers=headers, content=body)
    lines = logs.access_lines()
    assert len(lines) == len(HOSTILE)
    for line in lines:
        fields = dict(item.split("=", 1) for item in line.split(" "))
        assert list(fields) == ["client", "method", "endpoint", "notes", "status", "ms"], line
        assert fields["client"] in fingerprints | {"-"}, line
        assert fields["method"] in METHODS | {"other"}, line
        assert fields["endpoint"] in routes, line
        assert fields["notes"].isdigit() and fields["status"].isdigit(), line
    metrics = service.get("/metrics", headers=AUTH).text
    labels = {part.split('"')[1] for part in metrics.split("endpoint=")[1:]}
    assert labels <= routes, labels


def test_attack_the_client_id_names_the_token_and_cannot_be_chosen_by_the_client(
        service, logs):
    """The id is 16 hex digits of the token's SHA-256 (64 bits: no prefix or part of the
    token; 256-bit tokens from deploy/service-token.sh cannot be found from it), the same for
    the same token, another for another token. Sending an id, or a forwarding header, as
    credentials gets a 401, not that client's id."""
    ids = []
    for token in (TOKEN, TOKEN, OTHER_TOKEN):
        service.get("/model", headers={"Authorization": f"Bearer {token}"})
        ids.append(logs.access_lines()[-1].split(" ")[0].removeprefix("client="))
    assert ids[0] == ids[1] != ids[2]
    for client_id in ids:
        digest = client_id.removeprefix("token:")
        assert len(digest) == 16 and int(digest, 16) >= 0
        assert digest not in TOKEN and digest not in OTHER_TOKEN
    forged = [{"Authorization": f"Bearer {ids[2]}"},
              {"Authorization": f"Bearer {ids[2].removeprefix('token:')}"},
              {"X-Forwarded-For": ids[2], "Authorization": f"Bearer {ids[2]}"}]
    for headers in forged:
        assert service.get("/model", headers=headers).status_code == 401
        assert logs.access_lines()[-1].startswith("client=- ")
    # With tokens the id comes from the token, never from the peer's (forwarded) address.
    service.get("/model", headers=AUTH | {"X-Forwarded-For": "10.0.0.9"})
    assert logs.access_lines()[-1].split(" ")[0] == f"client={ids[0]}"


def test_attack_a_trailing_slash_redirect_logs_no_query(service, logs):
    """``/model/?note=...`` is Starlette's 307 to ``/model?note=...`` (before authentication;
    the Location header gives the client its own query back, URL-encoded): the access log
    has the route-less ``unknown`` and no query."""
    response = service.get(f"/model/?note={NOTE}", follow_redirects=False)
    assert response.status_code == 307
    assert logs.access_lines() == [logs.access_lines()[0]]
    assert " endpoint=unknown " in logs.access_lines()[0]
    assert not any(word in logs.text() for word in WORDS)


def test_attack_metrics_need_a_token_and_never_name_a_client(service):
    assert service.get("/metrics").status_code == 401
    assert service.get("/metrics", headers={"Authorization": f"Bearer {NOTE}"}).status_code == 401
    service.post("/predict", json={"notes": ["cough"]}, headers=AUTH)
    text = service.get("/metrics", headers=AUTH).text
    assert "token:" not in text and "addr:" not in text and "client" not in text


@pytest.mark.parametrize("header", [
    {"notes": NOTE},
    {"notes": 1, "fingerprint": "{fingerprint}", "dimension": NOTE, "classes": NOTE},
    {"notes": 1, "fingerprint": NOTE},
], ids=["notes", "dimension-classes", "fingerprint"])
def test_attack_encrypted_header_values_are_not_echoed_in_errors(service, classifier, header):
    header = {k: (classifier.fingerprint if v == "{fingerprint}" else v)
              for k, v in header.items()}
    response = service.post("/encrypted/predict", content=wire.pack(header, []),
                            headers=AUTH | {"content-type": wire.MEDIA_TYPE})
    assert response.status_code in (409, 422)
    assert CANARY not in response.text, response.text


def test_attack_a_note_with_a_lone_surrogate_is_a_422_not_a_500(service, logs):
    body = ('{"notes": ["' + NOTE + ' \\ud800 end"]}').encode()
    response = service.post("/predict", content=body,
                            headers=AUTH | {"content-type": "application/json"})
    assert not any(word in response.text + logs.text() for word in WORDS)  # holds today
    assert response.status_code == 422, response.text


def test_attack_a_lone_surrogate_500_logs_neither_the_note_nor_its_message(service, logs):
    """What holds today about the 500 above: the client learns nothing, the log has the
    exception's type and place only, and the next request is served."""
    body = ('{"notes": ["' + NOTE + ' \\udfff"]}').encode()
    response = service.post("/predict", content=body,
                            headers=AUTH | {"content-type": "application/json"})
    assert response.status_code in (422, 500)
    assert not any(word in response.text + logs.text() for word in WORDS)
    assert "surrogates not allowed" not in logs.text()
    assert service.post("/predict", json={"notes": ["cough"]}, headers=AUTH).status_code == 200


def _served(monkeypatch, *argv: str):
    """The ASGI app ``clinical-fl-serve ARGV`` runs: the app it passes to uvicorn.run, wrapped
    by uvicorn with the options it passes (uvicorn.Config.load), never listening."""
    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app,
                                                                             options=options))
    assert serve_cli.main(list(argv)) == 0
    options = {k: v for k, v in served["options"].items() if not k.startswith("ssl")}
    config = uvicorn.Config(served["app"], **options, log_config=None)
    config.load()
    return served["app"], config.loaded_app


def test_attack_forwarded_for_cannot_choose_the_client_id_or_escape_the_rate_limit(
        adapter, logs, monkeypatch):
    app, asgi = _served(monkeypatch, "--adapter", str(adapter), "--insecure",
                        "--rate-limit", "2")
    import asyncio

    async def ask() -> list[int]:
        statuses = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=asgi, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for i in range(4):
                    # uvicorn takes the last comma-separated entry: a note without commas
                    forwarded = f"{NOTE.replace(',', '')} endpoint=/forged{i} status=200"
                    response = await client.post("/predict", json={"notes": ["cough"]},
                                                 headers={"X-Forwarded-For": forwarded})
                    statuses.append(response.status_code)
        return statuses

    statuses = asyncio.run(ask())
    lines = logs.access_lines()
    assert not any(word in "\n".join(lines) for word in WORDS), lines
    assert all(line.startswith("client=addr:127.0.0.1 ") for line in lines), lines
    assert statuses == [200, 200, 429, 429], statuses


# -- the hospital: training progress, and the run config -----------------------------------

NODE = 7


@pytest.fixture(scope="module")
def hospital(tiny_random_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("attack-hospital")
    export = write_canary_export(root / "export" / "notes.csv", hospital=0, notes=24)
    files = ("data=files", f"data.labels=[{','.join(LABELS)}]", "train.batch_size=8",
             "train.local_epochs=1")
    plain = compose_task(tiny_random_bert, *files, labels=LABELS)
    dp = compose_task(tiny_random_bert, *files, "privacy=dp_sgd",
                      "privacy.dp_sgd.target_epsilon=2", "train.local_epochs=1",
                      labels=LABELS, planned_rounds=2)
    node_config = {"partition-id": 0, "data-path": str(export), "text-column": "text",
                   "label-column": "label", "deid": "allowed"}
    return {"root": root, "model": tiny_random_bert, "node_config": node_config,
            "files": files, "plain": task_settings_to_yaml(plain),
            "dp": task_settings_to_yaml(dp), "arrays": initial_arrays(task_settings_to_yaml(dp))}


@pytest.fixture
def identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 31, NODE
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def _train(hospital, settings_yaml: str, state: Path, run_id: int = 31,
           **node_config) -> Message:
    context = Context(run_id=run_id, node_id=NODE, state=RecordDict(), run_config={},
                      node_config={**hospital["node_config"], "state-dir": str(state),
                                   **node_config})
    config = ConfigRecord({m.TASK_KEY: settings_yaml, m.SERVER_ROUND_KEY: 1})
    msg = Message(RecordDict({m.ARRAYS_RECORD: hospital["arrays"], m.CONFIG_RECORD: config}),
                  dst_node_id=NODE, message_type="train")
    return hospital_app(msg, context)


class _FlowerLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def flower_log():
    handler = _FlowerLog()
    FLOWER_LOGGER.addHandler(handler)
    yield handler
    FLOWER_LOGGER.removeHandler(handler)


PROGRESS_WORDS = ("local training", "DP-SGD:", "epoch(s) of", "steps in")


@pytest.mark.parametrize("kind,policy", [("plain", {}),
                                         ("dp", {"max-epsilon": 3.0, "require-dp": True})])
def test_attack_training_progress_goes_to_the_hospital_log_only(
        hospital, identity, tmp_path, capfd, caplog, flower_log, kind, policy):
    """Progress lines (steps per epoch: under DP-SGD about records / batch size) go to
    hospital.log; not to stderr/stdout (the server's console in simulation), not to Flower's
    logger, not to the root logger even when a library set it to DEBUG, not into the reply."""
    caplog.set_level(logging.DEBUG)  # a third party that turned the root logger up
    tasks_logger = logging.getLogger("tasks")
    before = (tasks_logger.level, tasks_logger.propagate, list(tasks_logger.handlers))
    reply = _train(hospital, hospital[kind], tmp_path / "state", **policy)
    assert not reply.has_error(), reply.error.reason
    local = (tmp_path / "state" / HOSPITAL_LOG).read_text()
    assert ("DP-SGD: done" if kind == "dp" else "local training: done") in local, local
    captured = capfd.readouterr()
    elsewhere = "\n".join([captured.out, captured.err, caplog.text, *flower_log.lines])
    assert not any(word in elsewhere for word in PROGRESS_WORDS), elsewhere[-2000:]
    assert not holds_canary(elsewhere)
    table = m.metric_table("train")
    metrics = dict(reply.content[m.METRICS_RECORD])
    assert set(metrics) <= set(table), metrics  # the protocol's keys, nothing about progress
    if kind == "dp":
        assert all(table[key].under_dp_sgd for key in metrics), metrics  # no timing
    assert (tasks_logger.level, tasks_logger.propagate, list(tasks_logger.handlers)) == before


def test_attack_progress_outside_a_message_reaches_no_console(capfd):
    """Training outside a message (no hospital edge: a benchmark, a notebook) with the
    ClientApp's logging (fl_app.console.quiet_third_party): INFO progress is not printed."""
    import fl_app.hospital.client_app  # noqa: F401 - installs quiet_third_party's root handler

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # even with the root logger turned up by someone
    try:
        progress = TrainingProgress(2, 3, "local training", every_s=0.0)
        for epoch in (0, 1):
            for _ in range(3):
                progress.step(epoch)
        progress.finish()
    finally:
        root.setLevel(level)
    captured = capfd.readouterr()
    assert "local training" not in captured.out + captured.err


def _from_run_config(hospital, run_config: dict) -> str:
    """The task settings a ServerApp sends for this run config (compose_run_config, then
    task_settings as fl_app/server/server_app.py does, planned rounds as it plans them)."""
    base = [f"model.name_or_path={hospital['model']}", *FAST, *hospital["files"]]
    overrides = " ".join([*base, run_config.pop("overrides", "")])
    if NO_DEID not in overrides and "data.deid" not in overrides:
        overrides += f" {NO_DEID}"
    _, cfg = compose_run_config({**run_config_defaults(), **run_config,
                                 "overrides": overrides})
    settings = task_settings(cfg, LABELS)
    settings.planned_rounds = int(cfg.num_rounds)
    return task_settings_to_yaml(settings)


HOSTILE_RUN_CONFIGS = [  # id, run config, the hospital's node config, refusal (and its key)
    ("privacy-none", {"privacy": "none"}, {}, "4007 policy-refused key=require-dp"),
    ("central-dp-only", {"privacy": "central_dp"}, {}, "4007 policy-refused key=require-dp"),
    ("epsilon-inf", {"privacy": "dp_sgd", "target-epsilon": math.inf}, {},
     "4007 policy-refused key=require-dp"),
    ("epsilon-1e9", {"privacy": "dp_sgd", "target-epsilon": 1e9}, {},
     "4007 policy-refused key=max-epsilon"),
    ("rounds-1e5-epochs-100", {"privacy": "dp_sgd", "num-server-rounds": 100_000,
                               "overrides": "train.local_epochs=100"}, {},
     "4031 privacy-budget-refused"),
    ("delta-0.5", {"privacy": "dp_sgd", "overrides": "privacy.dp_sgd.target_delta=0.5"}, {},
     "4031 privacy-budget-refused key=privacy.dp_sgd.target_delta"),
    ("data-path", {"privacy": "dp_sgd", "data-path": "/etc/hosts"}, {},
     "4003 data-mapping-refused key=data.path"),
    ("deid-off", {"privacy": "dp_sgd", "overrides": "data.deid.enabled=false"},
     {"deid": "required"}, "4007 policy-refused key=data.deid.enabled"),
]


@pytest.mark.parametrize("case", HOSTILE_RUN_CONFIGS, ids=[c[0] for c in HOSTILE_RUN_CONFIGS])
def test_attack_a_hostile_run_config_cannot_loosen_a_hospitals_policy(
        hospital, identity, tmp_path, monkeypatch, capfd, case):
    """The run config (typed keys and ``overrides``) is the server's: whatever it composes
    to, the hospital checks the task settings it receives against its own policy
    (max-epsilon 3, require-dp, its data mapping, de-identification) and refuses before any
    training step, with a refusal line only."""
    _name, run_config, node, expected = case
    for step, caller in (("train_with_dp_sgd", "tasks.privacy.mechanisms.dp_sgd"),
                         ("train_locally", "tasks.privacy.mechanisms.no_dp")):
        monkeypatch.setattr(f"{caller}.{step}", _no_step(step))
    text = _from_run_config(hospital, dict(run_config))
    reply = _train(hospital, text, tmp_path / "state", **{"max-epsilon": 3.0,
                                                           "require-dp": True, **node})
    assert reply.has_error(), "the hospital trained under a hostile run config"
    assert is_refusal_line(reply.error.reason), reply.error.reason
    assert reply.error.reason == expected
    captured = capfd.readouterr()
    assert not holds_canary(reply.error.reason, captured.out, captured.err)


def _no_step(name: str):
    def step(*_args, **_kwargs):  # noqa: ANN202
        raise AssertionError(f"{name} ran under a hostile run config")
    return step


# -- ProgressGrid against a hostile SuperLink -----------------------------------------------


class _FakeLink:
    """A SuperLink as a Grid sees it: ``accept`` says which pushes it takes (None: refused),
    ``answers`` which pulls give replies, and it records every id asked for."""

    def __init__(self, accept=None, answers=None) -> None:
        self.accept = accept or (lambda i: True)
        self.answers = answers or (lambda ids, pull: [])
        self.asked: list[set[str]] = []
        self.pulls = 0

    def push_messages(self, messages):
        return [f"id{i}" if self.accept(i) else None for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        ids = set(message_ids)
        self.asked.append(ids)
        self.pulls += 1
        return self.answers(ids, self.pulls)


def _messages(count: int) -> list[Message]:
    return [Message(RecordDict({m.CONFIG_RECORD: ConfigRecord({m.SERVER_ROUND_KEY: 3})}),
                    dst_node_id=100 + i, message_type="train") for i in range(count)]


def _reply(to: str, node: int) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=to, group_id="", created_at=time.time(), ttl=60,
                        message_type="train")
    return make_message(metadata=metadata, error=Error(code=0, reason="x"))


@pytest.fixture
def fast_poll(monkeypatch, identity):
    monkeypatch.setattr(progress_grid, "POLL_S", 0.01)


def test_attack_progress_grid_does_not_wait_for_a_message_the_link_refused(fast_poll):
    link = _FakeLink(accept=lambda i: i != 1,
                     answers=lambda ids, _: [_reply(i, 0) for i in sorted(ids)])
    replies = list(ProgressGrid(link).send_and_receive(_messages(3), timeout=None))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id2"]
    assert all(None not in asked for asked in link.asked)


def test_attack_progress_grid_returns_at_the_timeout_when_a_hospital_stays_silent(fast_poll):
    link = _FakeLink(answers=lambda ids, _: [_reply("id0", 0)] if "id0" in ids else [])
    started = time.monotonic()
    replies = list(ProgressGrid(link).send_and_receive(_messages(2), timeout=0.3))
    assert 0.3 <= time.monotonic() - started < 5
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0"]


def test_attack_progress_grid_asks_for_each_reply_once_and_logs_no_content(fast_poll, caplog):
    """A reply already received is not asked for again (an honest link then never hands it
    twice), and the waiting line names the round, counts and hospitals only."""
    caplog.set_level(logging.INFO, logger="fl_app.server.grids.progress")

    def answers(ids: set[str], pull: int) -> list[Message]:
        return [_reply("id0", 100)] if pull == 1 else (
            [_reply("id1", 101)] if pull >= 5 and "id1" in ids else [])

    link = _FakeLink(answers=answers)
    grid = ProgressGrid(link, hospital_of=lambda node: node - 100, every_s=0.0)
    replies = list(grid.send_and_receive(_messages(2), timeout=10))
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0", "id1"]
    assert all("id0" not in asked for asked in link.asked[1:])
    assert "round 3 train: 1 of 2 hospitals answered" in caplog.text
    assert "waiting for hospital 1" in caplog.text


def test_attack_progress_grid_keeps_flowers_semantics_for_replies_it_did_not_ask_for(
        fast_poll):
    """A hostile link that hands a reply twice in one pull, or one for an id never sent, gets
    them passed on as Flower's own Grid.send_and_receive would (it filters neither): the
    strategy layer, not the Grid, must not count a node twice (see the report)."""
    link = _FakeLink(answers=lambda ids, _: [_reply("id0", 100), _reply("id0", 100),
                                             _reply("nobody", 999)])
    replies = list(ProgressGrid(link).send_and_receive(_messages(1), timeout=5))
    assert len(replies) == 3 and link.pulls == 1


def test_attack_progress_grid_with_an_empty_push_returns_at_once(fast_poll):
    link = _FakeLink(accept=lambda i: False)
    started = time.monotonic()
    assert list(ProgressGrid(link).send_and_receive(_messages(2), timeout=None)) == []
    assert time.monotonic() - started < 1 and link.pulls == 0

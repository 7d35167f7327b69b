"""Which settings of a run become MLflow params: those that take effect.

The full resolved configuration is the artifact ``config/resolved_config.yaml``; the params
are for comparing runs, so they leave out what the run does not use:

- a section that is switched off (``privacy.dp_sgd`` under another ``privacy.mechanism``,
  ``secure_aggregation``
  with mode none, ``audit`` without canaries or an updates folder, ``drill`` without faults),
  except the switch of a section that is on by default (``data.deid.enabled=False`` shows);
- ``privacy.mechanism`` when it is ``none`` (a non-private run logs no ``privacy.*`` param);
- a strategy parameter the chosen strategy does not read (``strategy.proximal_mu`` under
  FedAvg), a data setting of the other kind of source, a long-note setting under truncation;
- a value that is None (the default behaviour), except where None is itself a choice
  (``update_checks.max_update_norm``: no bound), logged as ``none``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def _mechanism_is(name: str) -> Callable[[Mapping, Mapping], bool]:
    return lambda _, config: _select(config, "privacy.mechanism") == name


# Section -> whether it is on (given the section and the whole configuration), and the keys of
# it logged while it is off.
SWITCHED: dict[str, tuple[Callable[[Mapping, Mapping], bool], tuple[str, ...]]] = {
    "privacy.dp_sgd": (_mechanism_is("dp_sgd"), ()),
    "privacy.distributed_dp": (_mechanism_is("distributed_dp"), ()),
    "privacy.central_dp": (lambda s, _: bool(s.get("enabled")), ()),
    "secure_aggregation": (lambda s, _: s.get("mode", "none") != "none", ()),
    "audit": (lambda s, _: bool(s.get("canaries_path") or s.get("updates_dir")), ()),
    "drill": (lambda s, _: bool(s.get("faults")), ()),
    "data.deid": (lambda s, _: bool(s.get("enabled")), ("enabled",)),
    "early_stopping": (lambda s, _: bool(s.get("enabled")), ("enabled",)),
}

# strategies/registry.py: each strategy reads only its own parameters.
STRATEGY_PARAMS = {
    "proximal_mu": ("fedprox",),
    "server_learning_rate": ("fedavgm",), "server_momentum": ("fedavgm",),
    "eta": ("fedadam", "fedyogi"), "eta_l": ("fedadam", "fedyogi"),
    "beta_1": ("fedadam", "fedyogi"), "beta_2": ("fedadam", "fedyogi"),
    "tau": ("fedadam", "fedyogi"),
    "trim_beta": ("fedtrimmedavg",),
    "num_malicious_nodes": ("krum",),
}

# tasks/data/hospital_data.py: what only built-in notes read, what only files and datasets read.
SYNTHETIC_ONLY = ("notes_per_hospital", "note_length", "label_noise", "server_test_notes")
RECORDS_ONLY = ("path", "format", "text_column", "label_column", "site_column",
                "split_column", "test_split")
CHUNK_ONLY = ("chunk_stride", "max_chunks", "window_pooling")  # model.long_notes=chunk

# None that is a choice of its own, not "the default behaviour".
NONE_MEANS = ("update_checks.max_update_norm",)


def _leave_out(config: Mapping) -> set[str]:
    """Dotted keys (sections or values) of settings that take no effect in this run."""
    out: set[str] = set()
    for section, (is_on, kept) in SWITCHED.items():
        node = _select(config, section)
        if isinstance(node, Mapping) and not is_on(node, config):
            out.update(f"{section}.{key}" for key in node if key not in kept)
    if _select(config, "privacy.mechanism") == "none":  # shown as it was: no privacy.* param
        out.add("privacy.mechanism")
    strategy = _select(config, "strategy") or {}
    out.update(f"strategy.{key}" for key, users in STRATEGY_PARAMS.items()
               if strategy.get("name") not in users)
    data = _select(config, "data") or {}
    if data:
        other = RECORDS_ONLY if data.get("source") == "synthetic" else SYNTHETIC_ONLY
        out.update(f"data.{key}" for key in other)
        if not data.get("split_column"):
            out.add("data.test_split")
    model = _select(config, "model") or {}
    if model.get("long_notes") == "truncate":
        out.update(f"model.{key}" for key in CHUNK_ONLY)
    return out


def _select(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def run_params(config: Mapping) -> dict[str, str]:
    """The resolved configuration (a nested dict) as MLflow params: dotted keys, values as
    text, only the settings that take effect (see the module's docstring)."""
    out = _leave_out(config)
    params: dict[str, str] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in out:
                continue
            if isinstance(value, Mapping):
                walk(value, name + ".")
            elif value is None:
                if name in NONE_MEANS:
                    params[name] = "none"
            else:
                params[name] = str(value)

    walk(config, "")
    return params

"""Flower's own strategies, chosen by name. We configure them; we do not rewrite them."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from clinical_fl.protocol.messages import WEIGHT_KEY
from clinical_fl.settings.strategy import StrategyName, StrategySettings

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]



def build_strategy(settings: StrategySettings, train_metrics: MetricsAggregator,
                   evaluate_metrics: MetricsAggregator) -> Strategy:
    common = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_hospitals,
        min_evaluate_nodes=settings.min_hospitals,
        min_available_nodes=settings.min_hospitals,
        weighted_by_key=WEIGHT_KEY,
        train_metrics_aggr_fn=train_metrics,
        evaluate_metrics_aggr_fn=evaluate_metrics,
    )
    name = settings.name
    if name == StrategyName.fedavg:
        return FedAvg(**common)
    if name == StrategyName.fedprox:
        return FedProx(**common, proximal_mu=settings.proximal_mu)
    if name == StrategyName.fedavgm:
        return FedAvgM(**common, server_learning_rate=settings.server_learning_rate,
                       server_momentum=settings.server_momentum)
    if name in (StrategyName.fedadam, StrategyName.fedyogi):
        cls = FedAdam if name == StrategyName.fedadam else FedYogi
        return cls(**common, eta=settings.eta, eta_l=settings.eta_l, beta_1=settings.beta_1,
                   beta_2=settings.beta_2, tau=settings.tau)
    if name == StrategyName.fedmedian:
        return FedMedian(**common)
    if name == StrategyName.fedtrimmedavg:
        return FedTrimmedAvg(**common, beta=settings.trim_beta)
    if name == StrategyName.krum:
        return Krum(**common, num_malicious_nodes=settings.num_malicious_nodes)
    raise ValueError(f"strategy.name={name!r} has no builder")

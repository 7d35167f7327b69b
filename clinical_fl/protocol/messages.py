"""What the server and the hospitals say to each other: every message key, and one table of
the metrics a hospital may report.

A hospital builds its replies from these keys (``fl_app/hospital/replies.py``), the server
combines the metrics by the rule in the table (``strategies/metric_rules.py``) and
logs each under its MLflow name (``clinical_fl/tracking/round_log.py``). A metric without a row
here cannot be sent (a test checks every reply), combined or logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from clinical_fl.protocol.refusals import BY_NAME

# --- Records and keys of the messages -------------------------------------------------

# ConfigRecord key of every server message: the task settings (YAML) a hospital validates.
TASK_KEY = "task"
CONFIG_RECORD = "config"  # Flower's name for the record of a message's settings
ARRAYS_RECORD = "arrays"  # the trainable parameters, float32
METRICS_RECORD = "metrics"
# Set by Flower's strategies in the train config: the round, and FedProx's proximal term.
SERVER_ROUND_KEY = "server-round"
PROXIMAL_MU_KEY = "proximal-mu"
# Set by the server under train.lr_schedule=cosine: this round's factor of the learning rates.
LR_FACTOR_KEY = "lr-factor"
# Set by Flower's client-side fixed-clipping DP wrapper: clip the update to this L2 norm.
CLIPPING_NORM_KEY = "clipping_norm"

# The preflight query: can this hospital take part, and how much data does it hold.
PREFLIGHT_QUERY = "preflight"
PREFLIGHT_STATUS_RECORD = "status"
PREFLIGHT_COUNTS_RECORD = "counts"
PREFLIGHT_OK = "ok"
PREFLIGHT_PROBLEM = "problem"  # stops the run, naming the hospital
PREFLIGHT_DECLINED = "declined"  # the hospital's policy keeps it out of this run
PREFLIGHT_HOSPITAL = "hospital"
TRAIN_RECORDS = "train-records"
EVAL_RECORDS = "eval-records"
EMPTY_TEXTS_DROPPED = "empty-texts-dropped"
# Absent under DP-SGD (exact statistics of private records) unless the server asked for noisy
# counts (privacy.dp_sgd.label_count_noise), which each hospital books in its privacy ledger.
LABEL_COUNTS = "label-counts"
# With secure_aggregation=ckks: the public half of the hospital's key material (no secret key),
# its fingerprint and parameters, so the server checks every hospital holds the same key.
PREFLIGHT_CKKS_RECORD = "ckks"
CKKS_PUBLIC = "public-context"
CKKS_FINGERPRINT = "fingerprint"
CKKS_PARAMETERS = "parameters"

# Error codes are those of clinical_fl/protocol/refusals.py (what a hospital may say when
# it refuses).
# A train reply when the hospital's privacy budget refuses the round:
PRIVACY_BUDGET_REFUSED = BY_NAME["privacy-budget-refused"].code

# Secure aggregation (clinical_fl/secure_aggregation/): every stage is a train message carrying this
# ConfigRecord; the hospital's mod answers the protocol's stages itself and hands only the
# collect stage (training) to the train handler, without the record.
SECAGG_RECORD = "secure-aggregation"
SECAGG_STAGE = "stage"
# SecAgg+ stages, in order (secure against a lying server: clinical_fl/secure_aggregation/
# secagg_plus.py), and CKKS's two.
STAGE_SETUP = "setup"  # settings in; the hospital's two public keys out
STAGE_SHARE_KEYS = "share-keys"  # neighbours' public keys in; encrypted Shamir shares out
STAGE_COLLECT = "collect"  # the train message plus shares for it; a masked update out
STAGE_CONSISTENCY = "consistency"  # who is alive in; a signature of the hospital's view out
STAGE_UNMASK = "unmask"  # the alive list and its signatures; the shares that remove masks out
STAGE_CKKS_COLLECT = "ckks-collect"  # the train message; an encrypted update out
STAGE_CKKS_DECRYPT = "ckks-decrypt"  # the encrypted sum in; the sum out
# Keys of the stages' records.
SECAGG_ROUND = "round"
SECAGG_NODES = "node-ids"
SECAGG_THRESHOLD = "threshold"
SECAGG_CLIPPING_RANGE = "clipping-range"
SECAGG_QUANTIZATION_RANGE = "quantization-range"
SECAGG_MAX_WEIGHT = "max-weight"  # the largest aggregation weight of the round's hospitals
SECAGG_PUBLIC_KEY_1 = "pk1"  # pairwise masks (ECDH)
SECAGG_PUBLIC_KEY_2 = "pk2"  # encrypting the shares to each neighbour (ECDH + Fernet)
SECAGG_SIGNING_KEY = "signing-key"  # a hospital's long-term public key (OpenSSH line)
SECAGG_SIGNATURE = "signature"  # its signature: of its round keys, or of its view
SECAGG_SOURCES = "sources"
SECAGG_DESTINATIONS = "destinations"
SECAGG_CIPHERTEXTS = "ciphertexts"
SECAGG_ALIVE = "alive"  # the hospitals whose masked update the server holds
SECAGG_SIGNERS = "signers"  # node ids beside SECAGG_SIGNATURE lists
SECAGG_SHARE_OWNERS = "share-owners"
SECAGG_SHARE_VALUES = "share-values"
SECAGG_LENGTH = "length"
SECAGG_DIGEST = "digest"  # CKKS: signing.ciphertexts_digest of each contributor's update
# CKKS collect replies: beside the ciphertexts, the hospital's long-term key and its signature
# of them (signing.contribution_statement), in a ConfigRecord of their own.
SECAGG_CONTRIBUTION_RECORD = "secure-aggregation-contribution"
# The masked update (uint32, one flat array) or the decrypted sum (float64) in a reply.
SECAGG_VECTOR = "vector"
# Set by the hospital's own secure-aggregation mod in the train config it hands the handler
# (and removed from any message that did not come through the protocol): distributed DP sends
# its noisy sum only when this is true.
SECURE_AGGREGATION_ON = "secure-aggregation-on"
# Set by the same mod beside it: the round's threshold (the fewest hospitals in a released
# sum) and the hospitals this one shares the round with, which distributed DP's noise share
# is checked against before any step.
SECURE_AGGREGATION_THRESHOLD = "secure-aggregation-threshold"
SECURE_AGGREGATION_HOSPITALS = "secure-aggregation-hospitals"
# Error code of a secure-aggregation stage a hospital cannot complete (the reason says why).
SECURE_AGGREGATION_FAILED = BY_NAME["secure-aggregation-failed"].code


# --- Metrics ----------------------------------------------------------------------------

# A value a hospital's policy does not release: NaN for a score, an empty list for counts.
# Replies keep every key (Flower aggregates only replies with identical keys); rules skip it.
WITHHELD = math.nan


def released(value: int | float | list) -> bool:
    if isinstance(value, list):
        return bool(value)
    return not (isinstance(value, float) and math.isnan(value))


class Rule(Enum):
    """How the server combines one metric across hospitals."""

    WEIGHTED_MEAN = "weighted_mean"  # by the weighting key (records seen)
    SUM = "sum"  # element-wise for lists
    MAX = "max"
    MIN = "min"
    MAX_AND_MEAN = "max_and_mean"  # the key holds the max; "<key>-mean" the plain mean
    PER_HOSPITAL = "per_hospital"  # reported per hospital, never combined


@dataclass(frozen=True)
class Metric:
    key: str
    rule: Rule
    # MLflow name of the combined value (None: not logged combined, and why in a comment).
    mlflow: str | None
    # Name under hospital_<k>/ in MLflow (None: not logged per hospital).
    per_hospital: str | None = None
    # Whether a hospital may send it while training under DP-SGD: False for values that are
    # exact functions of the private training records, outside what epsilon covers.
    under_dp_sgd: bool = True


# Keys used by name in code.
NUM_EXAMPLES = "num-examples"
WEIGHT_KEY = "aggregation-weight"  # what FedAvg weights by: records, or 1 under client-level DP
HOSPITAL = "hospital"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
CLIPPING_NORM = "clipping-norm"
SAMPLE_RATE = "sample-rate"
DP_STEPS = "dp-steps"
LIFETIME_EPSILON = "lifetime-epsilon"
LIFETIME_DELTA = "lifetime-delta"
# Distributed DP: the epsilon were only the hospital's own share of the noise to protect it.
EPSILON_IF_ALONE = "epsilon-if-alone"
# Distributed DP's share, from the train handler to the secure-aggregation mod (hospital side
# only; the mod masks or encrypts the arrays as they are): how they are encoded.
DISTRIBUTED_SHARE_RECORD = "distributed-dp-share"
SHARE_ENCODING = "encoding"
SHARE_LATTICE = "lattice"  # uint32 levels on SecAgg+'s lattice (tasks/privacy/lattice.py)
SHARE_VALUES = "values"  # float64 values (CKKS)
SHARE_CLIPPING_RANGE = "clipping-range"
SHARE_LEVELS = "levels"
SHARE_THRESHOLD = "threshold"  # the t its noise share assumes: SecAgg+ must release no fewer
CAN_TRAIN_NEXT = "can-train-next"  # 0: the hospital's budget cannot pay for another round
SECAGG_SECONDS = "secure-aggregation-seconds"  # masking or encrypting the update
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
TRUE_POSITIVES = "true-positives"
FALSE_POSITIVES = "false-positives"
FALSE_NEGATIVES = "false-negatives"
COUNT_KEYS = (TRUE_POSITIVES, FALSE_POSITIVES, FALSE_NEGATIVES)
# Added by the server when it combines: how many hospitals replied.
REPLIES = "replies"

TRAIN_METRICS: tuple[Metric, ...] = (
    Metric(NUM_EXAMPLES, Rule.SUM, "train/records", "records"),
    # The weight is used by the aggregation itself, and is the record count or 1.
    Metric(WEIGHT_KEY, Rule.PER_HOSPITAL, None),
    Metric(HOSPITAL, Rule.PER_HOSPITAL, None),  # keys the per-hospital values
    # Computed on the training records without noise, and a round's duration follows the
    # Poisson batch sizes: neither is covered by epsilon.
    Metric(TRAIN_LOSS, Rule.WEIGHTED_MEAN, "train/loss", "train_loss", under_dp_sgd=False),
    # The round waits for the slowest hospital.
    Metric(TRAIN_SECONDS, Rule.MAX, "train/slowest_hospital_s", "train_s",
           under_dp_sgd=False),
    # Record-level DP, cumulative over the run per hospital. The federation is as private
    # as its least private hospital: epsilon and delta by max, noise by min.
    Metric(EPSILON, Rule.MAX_AND_MEAN, "privacy/epsilon_max", "epsilon"),
    Metric(DELTA, Rule.MAX, "privacy/delta", "delta"),
    Metric(NOISE_MULTIPLIER, Rule.MIN, "privacy/noise_multiplier"),
    Metric(CLIPPING_NORM, Rule.MAX, "privacy/clipping_norm"),
    Metric(SAMPLE_RATE, Rule.MAX, "privacy/sample_rate"),
    Metric(DP_STEPS, Rule.MAX, "privacy/dp_steps"),
    # The hospital's epsilon over every run on its ledger, at its own delta (its policy).
    Metric(LIFETIME_EPSILON, Rule.MAX, "privacy/lifetime_epsilon_max", "lifetime_epsilon"),
    Metric(LIFETIME_DELTA, Rule.MAX, "privacy/lifetime_delta"),
    Metric(EPSILON_IF_ALONE, Rule.MAX, "privacy/epsilon_if_alone_max", "epsilon_if_alone"),
    Metric(CAN_TRAIN_NEXT, Rule.SUM, "privacy/hospitals_within_budget"),
    # Quantising and masking (or encrypting) a vector of the adapter's fixed size: a function
    # of that size and the machine, not of the records.
    Metric(SECAGG_SECONDS, Rule.MAX, "secure_aggregation/hospital_seconds_max",
           "secure_aggregation_s"),
)

EVALUATE_METRICS: tuple[Metric, ...] = (
    Metric(NUM_EXAMPLES, Rule.SUM, "federated/records", "records"),
    Metric(WEIGHT_KEY, Rule.PER_HOSPITAL, None),
    Metric(HOSPITAL, Rule.PER_HOSPITAL, None),
    Metric(EVAL_LOSS, Rule.WEIGHTED_MEAN, "federated/loss", "loss"),
    Metric(ACCURACY, Rule.WEIGHTED_MEAN, "federated/accuracy", "accuracy"),
    # A local score; the federation's macro-F1 is derived from the summed per-class counts
    # (strategies/metric_rules.py) and logged under this name.
    Metric(MACRO_F1, Rule.PER_HOSPITAL, "federated/macro_f1", "macro_f1"),
    # Per-class counts: only from hospitals whose policy releases them (eval-metrics=full);
    # they are consumed by the macro-F1 and not logged.
    Metric(TRUE_POSITIVES, Rule.SUM, None),
    Metric(FALSE_POSITIVES, Rule.SUM, None),
    Metric(FALSE_NEGATIVES, Rule.SUM, None),
)

# Names of what the server adds when combining (not sent by hospitals).
COMBINED_ONLY = {
    "train": {REPLIES: "round/train_replies", f"{EPSILON}-mean": "privacy/epsilon_mean"},
    "evaluate": {REPLIES: "round/evaluate_replies"},
}


def metric_table(kind: str) -> dict[str, Metric]:
    """``kind``: "train" or "evaluate"."""
    rows = {"train": TRAIN_METRICS, "evaluate": EVALUATE_METRICS}[kind]
    return {row.key: row for row in rows}


def mlflow_names(kind: str) -> dict[str, str | None]:
    """Combined key -> MLflow name (None: deliberately not logged combined)."""
    names: dict[str, str | None] = {key: row.mlflow for key, row in metric_table(kind).items()}
    names.update(COMBINED_ONLY[kind])
    return names

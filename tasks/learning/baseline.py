"""TF-IDF + logistic regression: how hard is the data set?

    clinical-fl-baseline --hospitals 4 --notes-per-hospital 300
    clinical-fl-baseline --note-length long      # data=synthetic_long's notes, read whole
    clinical-fl-baseline --data-path ~/.cache/clinical-fl/ohsumed_single23.parquet \\
        --site-column site --split-column split --hospitals 8 \\
        --class-weight balanced --c-grid 0.1,0.3,1,3,10,30,100 --per-class

Trains on the federation's pooled training splits (what a centralized model
could see), or on one hospital's alone (--hospital), and scores the same
held-out splits the hospitals use, then the server's test set. With --c-grid,
C is chosen by macro-F1 on those held-out splits (the hospitals' validation
splits, carved from training documents), never on the test set; the test set
is scored once, with the chosen C. --class-weight balanced weighs class c by
N / (K x n_c) in the loss (scikit-learn's class_weight="balanced"); the
default, none, keeps every record's weight at 1.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score

from clinical_fl.settings.data import DataSettings, DataSource, NoteLength
from tasks.data.hospital_data import load_hospital_data, load_server_test_set, source_labels

CLASS_WEIGHTS = ("none", "balanced")
DEFAULT_C = 10.0


def class_weight_option(value: str) -> str | None:
    """``none`` or ``balanced`` as scikit-learn's ``class_weight`` (None / "balanced")."""
    if value not in CLASS_WEIGHTS:
        raise ValueError(f"class weight {value!r}: choose one of {', '.join(CLASS_WEIGHTS)} "
                         "(balanced weighs class c by N / (K x n_c); none weighs every record 1)")
    return None if value == "none" else "balanced"


def c_grid_option(value: str) -> list[float]:
    """``0.1,1,10`` -> [0.1, 1.0, 10.0]; every C finite and positive."""
    try:
        grid = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a comma-separated list of numbers, "
                                         "e.g. 0.1,1,10") from None
    if not grid or not all(0 < c < float("inf") for c in grid):
        raise argparse.ArgumentTypeError(f"{value!r}: at least one C, each finite and > 0")
    return grid


@dataclass
class BaselineResult:
    """What one fit scored. ``validation`` holds the macro-F1 of every C tried on the
    held-out (validation) splits; ``c`` is the one kept (the best there)."""

    labels: list[str]
    c: float
    class_weight: str
    train_counts: list[int]
    scores: dict[str, float] = field(default_factory=dict)
    validation: dict[float, float] = field(default_factory=dict)
    test_recall: list[float] | None = None  # per class, indexed like labels
    test_counts: list[int] | None = None


@dataclass
class Splits:
    """Texts and label ids, read once through the product's loaders: each hospital's
    training and held-out (validation) split, and the server's test set (None: none)."""

    labels: list[str]
    train: dict[int, tuple[list[str], list[int]]]
    eval: dict[int, tuple[list[str], list[int]]]
    test: tuple[list[str], list[int]] | None = None


def load_splits(settings: DataSettings, num_hospitals: int,
                hospitals: list[int] | None = None) -> Splits:
    """Hospitals ``hospitals`` (default: all) of ``num_hospitals``, and the server's test set."""
    for hospital in hospitals or []:
        if not 0 <= hospital < num_hospitals:
            raise ValueError(f"hospital {hospital}: choose one in [0, {num_hospitals})")
    labels = source_labels(settings)
    splits = Splits(labels=labels, train={}, eval={})
    for index in range(num_hospitals) if hospitals is None else hospitals:
        data = load_hospital_data(settings, labels, index, num_hospitals)
        splits.train[index] = (list(data.train["text"]), list(data.train["label"]))
        splits.eval[index] = (list(data.eval["text"]), list(data.eval["label"]))
    test = load_server_test_set(settings, labels)
    if test is not None:
        splits.test = (list(test["text"]), list(test["label"]))
    return splits


def fit_and_score(splits: Splits, *, class_weight: str = "none",
                  c_grid: list[float] | None = None, hospital: int | None = None
                  ) -> BaselineResult:
    """Fit on the pooled training splits (or hospital ``hospital``'s alone), choose C on the
    matching held-out splits when ``c_grid`` has several, score the server's test set once."""
    weight = class_weight_option(class_weight)
    if hospital is not None and hospital not in splits.train:
        raise ValueError(f"hospital {hospital}: not loaded (loaded: {sorted(splits.train)})")
    chosen = sorted(splits.train) if hospital is None else [hospital]
    train_texts = [t for i in chosen for t in splits.train[i][0]]
    train_y = [y for i in chosen for y in splits.train[i][1]]
    eval_texts = [t for i in chosen for t in splits.eval[i][0]]
    eval_y = [y for i in chosen for y in splits.eval[i][1]]
    labels = splits.labels
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    train_x = vectorizer.fit_transform(train_texts)
    eval_x = vectorizer.transform(eval_texts)
    grid = list(c_grid) if c_grid else [DEFAULT_C]
    validation, fitted = {}, {}
    for c in grid:
        classifier = LogisticRegression(max_iter=2000, C=c, class_weight=weight)
        classifier.fit(train_x, train_y)
        predicted = classifier.predict(eval_x)
        validation[c] = f1_score(eval_y, predicted, average="macro", zero_division=0)
        fitted[c] = (classifier, predicted)
    best = max(grid, key=lambda c: (validation[c], -grid.index(c)))  # ties: the first listed
    classifier, predicted = fitted[best]
    counts = Counter(train_y)
    result = BaselineResult(labels=labels, c=best, class_weight=class_weight,
                            train_counts=[counts.get(i, 0) for i in range(len(labels))],
                            validation=validation)
    result.scores = {"hospital_eval_accuracy": accuracy_score(eval_y, predicted),
                     "hospital_eval_macro_f1": f1_score(eval_y, predicted, average="macro",
                                                        zero_division=0)}
    if splits.test is not None:
        test_texts, test_y = splits.test
        predicted = classifier.predict(vectorizer.transform(test_texts))
        result.scores["central_accuracy"] = accuracy_score(test_y, predicted)
        result.scores["central_macro_f1"] = f1_score(test_y, predicted, average="macro",
                                                     zero_division=0)
        everyone = list(range(len(labels)))
        result.test_recall = [float(r) for r in recall_score(
            test_y, predicted, labels=everyone, average=None, zero_division=0)]
        test_counts = Counter(test_y)
        result.test_counts = [test_counts.get(i, 0) for i in everyone]
    return result


def evaluate_tfidf(settings: DataSettings, num_hospitals: int, *, class_weight: str = "none",
                   c_grid: list[float] | None = None, hospital: int | None = None
                   ) -> BaselineResult:
    """``fit_and_score`` on the splits ``load_splits`` reads (only ``hospital``'s if given)."""
    class_weight_option(class_weight)  # a bad value fails before any data is read
    splits = load_splits(settings, num_hospitals, None if hospital is None else [hospital])
    return fit_and_score(splits, class_weight=class_weight, c_grid=c_grid, hospital=hospital)


def tfidf_baseline(settings: DataSettings, num_hospitals: int, *, class_weight: str = "none",
                   c_grid: list[float] | None = None, hospital: int | None = None
                   ) -> dict[str, float]:
    """The scores of ``evaluate_tfidf``; by default C=10, no class weights (as before)."""
    return evaluate_tfidf(settings, num_hospitals, class_weight=class_weight, c_grid=c_grid,
                          hospital=hospital).scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--notes-per-hospital", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--note-length", choices=[n.value for n in NoteLength],
                        default=NoteLength.short.value)
    parser.add_argument("--class-weight", choices=CLASS_WEIGHTS, default="none",
                        help="balanced: class c weighs N / (K x n_c) in the loss; "
                             "none (default): every record weighs the same")
    parser.add_argument("--c-grid", type=c_grid_option, default=None, metavar="C,C,...",
                        help="inverse regularization strengths to try, the best by macro-F1 "
                             f"on the hospitals' held-out splits is kept (default: {DEFAULT_C:g})")
    parser.add_argument("--hospital", type=int, default=None,
                        help="train on this hospital's training split alone (0-based)")
    parser.add_argument("--data-path", default=None,
                        help="a CSV / JSONL / Parquet export instead of the synthetic notes")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--site-column", default=None,
                        help="the column naming each record's hospital (natural partitioning)")
    parser.add_argument("--split-column", default=None,
                        help="rows whose value is --test-split form the server's test set")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--per-class", action="store_true",
                        help="also print each class's training count and test recall")
    args = parser.parse_args()
    if args.data_path:
        settings = DataSettings(source=DataSource.files, path=args.data_path, seed=args.seed,
                                text_column=args.text_column, label_column=args.label_column,
                                site_column=args.site_column, split_column=args.split_column,
                                test_split=args.test_split)
    else:
        settings = DataSettings(notes_per_hospital=args.notes_per_hospital, seed=args.seed,
                                note_length=NoteLength(args.note_length))
    result = evaluate_tfidf(settings, args.hospitals, class_weight=args.class_weight,
                            c_grid=args.c_grid, hospital=args.hospital)
    for key, value in result.scores.items():
        print(f"{key}\t{value:.4f}")
    if args.c_grid:
        print(f"c\t{result.c:g}\t(macro-F1 on the held-out splits: " + ", ".join(
            f"C={c:g} {f1:.4f}" for c, f1 in result.validation.items()) + ")")
    if args.per_class and result.test_recall is not None:
        print("label\ttrain\ttest\ttest_recall")
        for name, n_train, n_test, recall in zip(result.labels, result.train_counts,
                                                 result.test_counts, result.test_recall,
                                                 strict=True):
            print(f"{name}\t{n_train}\t{n_test}\t{recall:.4f}")


if __name__ == "__main__":
    main()

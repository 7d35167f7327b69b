"""clinical-fl-baseline's class weights on planted imbalanced data (no shared data needed)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pandas as pd
import pytest

from clinical_fl.settings.data import DataSettings, DataSource
from tasks.learning.baseline import (
    Splits,
    c_grid_option,
    class_weight_option,
    evaluate_tfidf,
    fit_and_score,
    main,
)

COMMON = [f"a{i}" for i in range(12)]
OTHER = [f"b{i}" for i in range(12)]
RARE = ["r0", "r1", "r2"]


def _note(rng: random.Random, label: str) -> str:
    """``common`` and ``other`` notes draw their own words; a ``rare`` note is a common
    note with two words of its own: only weighting makes those few words count."""
    if label == "other":
        return " ".join(rng.choices(OTHER, k=10))
    words = rng.choices(COMMON, k=10)
    if label == "rare":
        words[rng.randrange(10)] = rng.choice(RARE)
        words[rng.randrange(10)] = rng.choice(RARE)
    return " ".join(words)


def _planted(seed: int, counts: dict[str, int]) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    labels = sorted(counts)
    rows = [(_note(rng, label), labels.index(label))
            for label, n in counts.items() for _ in range(n)]
    rng.shuffle(rows)
    return [t for t, _ in rows], [y for _, y in rows]


LABELS = ["common", "other", "rare"]
TRAIN = {"common": 200, "other": 200, "rare": 6}
TEST = {"common": 40, "other": 40, "rare": 40}


def _splits(test: tuple[list[str], list[int]] | None = None) -> Splits:
    return Splits(labels=LABELS, train={0: _planted(0, TRAIN)}, eval={0: _planted(1, TRAIN)},
                  test=test if test is not None else _planted(2, TEST))


def test_imbalance_balanced_weights_recall_the_rare_class_unweighted_misses():
    rare = LABELS.index("rare")
    plain = fit_and_score(_splits(), class_weight="none", c_grid=[1.0])
    balanced = fit_and_score(_splits(), class_weight="balanced", c_grid=[1.0])
    assert plain.test_recall[rare] == 0.0
    assert balanced.test_recall[rare] >= 0.8
    assert balanced.scores["central_macro_f1"] > plain.scores["central_macro_f1"] + 0.2
    assert balanced.test_recall[LABELS.index("other")] == 1.0  # the easy class is kept
    assert plain.train_counts == balanced.train_counts == [200, 200, 6]


def test_imbalance_c_is_chosen_on_validation_never_on_test():
    # Unweighted, only a weakly regularized fit learns the rare words: validation says so.
    grid = [0.01, 1.0, 1e4]
    scored = fit_and_score(_splits(), class_weight="none", c_grid=grid)
    assert scored.c == 1e4
    assert scored.validation[1e4] > scored.validation[0.01] + 0.1
    # The same fit against a test set with every label wrong, or none, chooses the same C.
    texts, y = _planted(2, TEST)
    wrong = fit_and_score(_splits((texts, [(v + 1) % 3 for v in y])),
                          class_weight="none", c_grid=grid)
    blind = fit_and_score(Splits(labels=LABELS, train={0: _planted(0, TRAIN)},
                                 eval={0: _planted(1, TRAIN)}),
                          class_weight="none", c_grid=grid)
    assert scored.c == wrong.c == blind.c
    assert scored.validation == wrong.validation == blind.validation
    assert wrong.scores["central_macro_f1"] < scored.scores["central_macro_f1"]
    assert blind.test_recall is None and "central_macro_f1" not in blind.scores


def test_imbalance_default_keeps_the_old_baseline():
    result = fit_and_score(_splits())
    assert result.class_weight == "none" and result.c == 10.0
    assert list(result.validation) == [10.0]


def test_imbalance_through_the_product_loaders(tmp_path: Path):
    """A file export with two sites and an official test split, as OHSUMED's table."""
    rows = []
    for split, counts, seed in (("train", {"common": 120, "other": 120, "rare": 10}, 3),
                                ("test", TEST, 4)):
        texts, y = _planted(seed, counts)
        rows += [{"text": t, "label": LABELS[v], "site": f"H{i % 2 + 1}", "split": split}
                 for i, (t, v) in enumerate(zip(texts, y, strict=True))]
    path = tmp_path / "notes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    settings = DataSettings(source=DataSource.files, path=str(path), site_column="site",
                            split_column="split")
    rare = LABELS.index("rare")
    plain = evaluate_tfidf(settings, 2, class_weight="none", c_grid=[1.0])
    balanced = evaluate_tfidf(settings, 2, class_weight="balanced", c_grid=[0.3, 1.0, 3.0])
    assert plain.test_recall[rare] == 0.0 < 0.8 <= balanced.test_recall[rare]
    assert sum(plain.test_counts) == sum(TEST.values())  # the test split, whole
    alone = evaluate_tfidf(settings, 2, class_weight="balanced", c_grid=[1.0], hospital=1)
    assert sum(alone.train_counts) < sum(balanced.train_counts)
    with pytest.raises(ValueError, match=r"hospital 2: choose one in \[0, 2\)"):
        evaluate_tfidf(settings, 2, hospital=2)


@pytest.mark.parametrize("value", ["balancd", "Balanced", "auto", ""])
def test_imbalance_bad_class_weight_is_refused(value: str):
    with pytest.raises(ValueError, match=f"class weight '{value}': choose one of none, "
                                         "balanced"):
        class_weight_option(value)
    with pytest.raises(ValueError, match="choose one of none, balanced"):
        fit_and_score(_splits(), class_weight=value)
    # Refused before any data is read: this path does not exist.
    with pytest.raises(ValueError, match="choose one of none, balanced"):
        evaluate_tfidf(DataSettings(source=DataSource.files, path="/nonexistent.csv"), 2,
                       class_weight=value)


def test_imbalance_bad_class_weight_on_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(sys, "argv", ["clinical-fl-baseline", "--class-weight", "auto"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "--class-weight: invalid choice: 'auto'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["clinical-fl-baseline", "--c-grid", "1,0"])
    with pytest.raises(SystemExit):
        main()
    assert "at least one C, each finite and > 0" in capsys.readouterr().err


def test_imbalance_c_grid_option():
    assert c_grid_option("0.1, 1,10") == [0.1, 1.0, 10.0]
    for bad in ("", "x", "1,-1", "inf"):
        with pytest.raises(Exception, match="C|numbers"):
            c_grid_option(bad)

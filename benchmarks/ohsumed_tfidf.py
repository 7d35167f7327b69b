"""OHSUMED TF-IDF + logistic regression, 5 or 23 classes, with and without class weights.

    .venv/bin/python benchmarks/ohsumed_tfidf.py --view single23   # 23 classes, imbalanced
    .venv/bin/python benchmarks/ohsumed_tfidf.py --view ma5        # the 5-class view
    .venv/bin/python benchmarks/ohsumed_tfidf.py --view single23 --prepare-only  # table only

Reads ../shared/data/ohsumed where it lies and writes the view's table outside
the repository (``~/.cache/clinical-fl/ohsumed_<view>.parquet``, only if it is
missing), with the eight case-mix hospitals of ohsumed_prepare.py: a document
in both views sits in the same hospital in both. ``single23`` keeps the
documents with exactly one MeSH disease category (``label_single23``, 3,357
train / 4,043 test), labelled by their code (C01-C23).

Every fit goes through ``clinical-fl-baseline``'s code (tasks/learning/baseline.py)
and the product's loaders: the hospitals' training splits, their held-out 20%
as the validation split (carved from the official training documents), the
official test split scored once. For each row, C is chosen on validation by
macro-F1 from --c-grid; the test set never chooses anything. Rows: centralized
(the eight hospitals' training splits pooled) and one hospital alone (the
largest by training documents unless --hospital names one), each without and
with balanced class weights. Printed: the training class counts, then one
Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from ohsumed_prepare import CASE_MIX, MA5_CODES, prepare

from clinical_fl.settings.data import DataSettings, DataSource
from tasks.learning.baseline import BaselineResult, c_grid_option, fit_and_score, load_splits

CACHE = Path("~/.cache/clinical-fl")
HOSPITALS = 8
SMALLEST = 5  # the classes whose test recall is shown, smallest by training count


def _read_parts(source: Path) -> pd.DataFrame:
    parts = sorted(source.glob("ohsumed_first20000_part*.csv"))
    if not parts:
        raise SystemExit(f"{source}: no ohsumed_first20000_part*.csv files")
    return pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts],
                     ignore_index=True)


def prepare_single23(source: Path, seed: int) -> pd.DataFrame:
    """The single-label 23-class view, each document in the case-mix hospital it has in the
    5-class table. A single-label document has no code besides its label, so the rule puts
    C04/C06/C10/C14/C23 documents in the general hospitals H6-H8 (dealt at random, exactly as
    in the 5-class table) and every other one in the group of its own label (H1-H5)."""
    ma5_site = dict(zip(*(prepare(source, seed)[c] for c in ("doc_id", "site")), strict=True))
    table = _read_parts(source)
    table = table[table["label_single23"] != ""].sort_values("doc_id", kind="stable")
    sites = []
    for doc_id, label in zip(table["doc_id"], table["label_single23"], strict=True):
        if label in MA5_CODES:
            sites.append(ma5_site[doc_id])  # in the 5-class view too: the same hospital
        else:
            sites.append(next(site for site, group in CASE_MIX if label in group))
    return pd.DataFrame({"doc_id": table["doc_id"].to_numpy(),
                         "text": table["text"].to_numpy(),
                         "label": table["label_single23"].to_numpy(),
                         "site": sites, "split": table["split"].to_numpy()})


def table_for(view: str, source: Path, seed: int, path: Path) -> Path:
    """The view's table at ``path``, written there first if it is missing."""
    path = path.expanduser()
    if path.is_file():
        return path
    if Path.cwd().resolve() in path.resolve().parents:
        raise SystemExit(f"{path}: write the table outside the repository (licence: no "
                         "redistribution)")
    table = prepare(source, seed) if view == "ma5" else prepare_single23(source, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
    print(f"{path}: {len(table)} documents written", flush=True)
    return path


def category_names(source: Path) -> dict[str, str]:
    names = pd.read_csv(source / "categories.csv", dtype=str, keep_default_na=False)
    return dict(zip(names["code"], names["name"], strict=True))


def row(setting: str, result: BaselineResult, smallest: list[int]) -> str:
    recall = result.test_recall or []
    zero = sum(1 for r, n in zip(recall, result.test_counts or [], strict=True)
               if n > 0 and r == 0)
    return (f"| {setting} | {result.class_weight} | {result.c:g} | "
            f"{result.scores['hospital_eval_macro_f1']:.3f} | "
            f"{result.scores['central_accuracy']:.3f} | "
            f"**{result.scores['central_macro_f1']:.3f}** | "
            + " | ".join(f"{recall[i]:.2f}" for i in smallest) + f" | {zero} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--view", choices=["single23", "ma5"], default="single23")
    parser.add_argument("--source", type=Path, default=Path("../shared/data/ohsumed"))
    parser.add_argument("--table", type=Path, default=None,
                        help="the view's prepared table (default: "
                             "~/.cache/clinical-fl/ohsumed_<view>.parquet, written if missing)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--c-grid", type=c_grid_option, metavar="C,C,...",
                        default=c_grid_option("0.1,0.3,1,3,10,30,100,300,1000,3000,10000"),
                        help="C is chosen on validation from these")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the view's table if missing, fit nothing")
    parser.add_argument("--hospital", default=None,
                        help="the hospital trained alone, by site name (default: the largest)")
    args = parser.parse_args()
    table = table_for(args.view, args.source, args.seed,
                      args.table or CACHE / f"ohsumed_{args.view}.parquet")
    if args.prepare_only:
        print(f"{table}: ready")
        return
    settings = DataSettings(source=DataSource.files, path=str(table), site_column="site",
                            split_column="split", seed=args.seed)
    frame = pd.read_parquet(table, columns=["label", "site", "split"])
    train = frame[frame["split"] == "train"]
    sizes = train["site"].value_counts()
    sites = sorted(sizes.index)  # partition i is the i-th site in sorted order
    if len(sites) != HOSPITALS:
        sys.exit(f"{table}: {len(sites)} sites, expected {HOSPITALS}")
    alone = args.hospital or max(sites, key=lambda s: (sizes[s], s))
    if alone not in sites:
        sys.exit(f"--hospital {alone}: not one of {', '.join(sites)}")

    names = category_names(args.source)
    counts = train["label"].value_counts()
    test_counts = frame[frame["split"] == "test"]["label"].value_counts()
    print(f"\n{args.view}: {len(train)} training documents, {len(frame) - len(train)} test; "
          "training documents per hospital: " + ", ".join(f"{s} {sizes[s]}" for s in sites)
          + f"; trained alone: {alone}" + (" (the largest)" if args.hospital is None else ""))
    print("\n| class | name | train | test | hospitals (train) |\n|---|---|---|---|---|")
    for label in sorted(counts.index, key=lambda lab: (-counts[lab], lab)):
        where = train[train["label"] == label]["site"].value_counts()
        print(f"| {label} | {names.get(label, '')} | {counts[label]} | "
              f"{test_counts.get(label, 0)} | "
              + ", ".join(f"{s} {where[s]}" for s in sorted(where.index)) + " |")

    splits = load_splits(settings, HOSPITALS)  # read (and de-identified) once for every fit
    results = []
    for setting, hospital in (("centralized (8 hospitals pooled)", None),
                              (f"{alone} alone", sites.index(alone))):
        for weight in ("none", "balanced"):
            result = fit_and_score(splits, class_weight=weight, c_grid=args.c_grid,
                                   hospital=hospital)
            results.append((setting, result))
            print(f"{setting}, class weight {weight}: C={result.c:g} (validation macro-F1 "
                  + ", ".join(f"{c:g} {f1:.3f}" for c, f1 in result.validation.items())
                  + ")", flush=True)
    labels = results[0][1].labels
    # Smallest by the official training split's count (the same classes in every row).
    smallest = sorted(range(len(labels)), key=lambda i: (counts.get(labels[i], 0), labels[i]))
    smallest = smallest[:SMALLEST]
    print("\n| trained on | class weight | C (chosen on validation) | validation macro-F1 | "
          "test accuracy | test macro-F1 | "
          + " | ".join(f"recall {labels[i]} ({counts.get(labels[i], 0)})" for i in smallest)
          + " | classes with zero test recall |")
    print("|---" * (7 + len(smallest)) + "|")
    for setting, result in results:
        print(row(setting, result, smallest))
    for setting in dict(results):
        picked = max((r for s, r in results if s == setting),
                     key=lambda r: r.scores["hospital_eval_macro_f1"])
        print(f"{setting}: validation picks class weight {picked.class_weight}")


if __name__ == "__main__":
    main()

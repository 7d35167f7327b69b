"""Build the OHSUMED 5-class benchmark table with a case-mix hospital for every document.

    .venv/bin/python benchmarks/ohsumed_prepare.py \\
        --source ../shared/data/ohsumed --out ~/.cache/clinical-fl/ohsumed_ma5.parquet

Reads the CSV parts where they lie (never copied into the repository) and
writes one Parquet file outside it, with the columns the loader is told about:
``text``, ``label`` (the 5-class view ``label_ma5`` as names), ``site`` and
``split`` (the official train/test split). The site follows the case-mix rule
of ../shared/data/README.md: a document goes to the first group whose
secondary MeSH codes it carries, H1 women's & children's (C13, C16), H2
infectious disease / immunology (C01 C02 C03 C20 C22), H3 musculoskeletal /
skin / environmental (C05 C17 C21), H4 respiratory / ENT / eye / dental (C07
C08 C09 C11), H5 internal medicine (C12 C15 C18 C19); documents with no
secondary code are the general hospitals H6-H8, dealt at random (seeded).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import pandas as pd

MA5_NAMES = {"1": "neoplasms", "2": "digestive", "3": "nervous", "4": "cardiovascular",
             "5": "general_pathological"}
MA5_CODES = {"C04", "C06", "C10", "C14", "C23"}
CASE_MIX = [("H1", {"C13", "C16"}), ("H2", {"C01", "C02", "C03", "C20", "C22"}),
            ("H3", {"C05", "C17", "C21"}), ("H4", {"C07", "C08", "C09", "C11"}),
            ("H5", {"C12", "C15", "C18", "C19"})]
GENERAL = ("H6", "H7", "H8")


def case_mix_site(codes: set[str], rng: random.Random) -> str:
    secondary = codes - MA5_CODES
    for site, group in CASE_MIX:
        if secondary & group:
            return site
    return rng.choice(GENERAL)


def prepare(source: Path, seed: int) -> pd.DataFrame:
    parts = sorted(source.glob("ohsumed_first20000_part*.csv"))
    if not parts:
        raise SystemExit(f"{source}: no ohsumed_first20000_part*.csv files")
    table = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts],
                      ignore_index=True)
    table = table[table["label_ma5"] != ""].sort_values("doc_id", kind="stable")
    rng = random.Random(seed)
    sites = [case_mix_site(set(codes.split("|")), rng) for codes in table["labels"]]
    return pd.DataFrame({"doc_id": table["doc_id"].to_numpy(), "text": table["text"].to_numpy(),
                         "label": table["label_ma5"].map(MA5_NAMES).to_numpy(),
                         "site": sites, "split": table["split"].to_numpy()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/ohsumed"))
    parser.add_argument("--out", type=Path,
                        default=Path("~/.cache/clinical-fl/ohsumed_ma5.parquet"))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = args.out.expanduser()
    if Path.cwd().resolve() in out.resolve().parents:
        raise SystemExit(f"{out}: write the table outside the repository (licence: no "
                         "redistribution)")
    table = prepare(args.source, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    print(f"{out}: {len(table)} documents")
    counts = Counter(zip(table["site"], table["split"], strict=True))
    for site in sorted(set(table["site"])):
        print(f"  {site}: train {counts[(site, 'train')]:5d}  test {counts[(site, 'test')]:5d}")


if __name__ == "__main__":
    main()

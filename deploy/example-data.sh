#!/usr/bin/env bash
# Write synthetic hospital exports (CSV: text,label) to try a deployment without real data.
#   bash deploy/example-data.sh OUT_DIR [HOSPITALS=2] [NOTES_PER_HOSPITAL=300]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: example-data.sh OUT_DIR [HOSPITALS] [NOTES]}"; hospitals="${2:-2}"; notes="${3:-300}"
mkdir -p "$out"
.venv/bin/python - "$out" "$hospitals" "$notes" <<'PY'
import csv, sys
from tasks.data.synthetic_notes import generate_hospital_notes
out, hospitals, notes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for k in range(hospitals):
    path = f"{out}/hospital-{k}.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for note in generate_hospital_notes(k, notes, seed=42, label_skew_alpha=1.0,
                                            label_noise=0.08):
            writer.writerow([note.text, note.label])
    print(path)
PY

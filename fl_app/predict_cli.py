"""``clinical-fl-predict``: classify notes with the adapter of a run (MLflow run id) or a folder.

    clinical-fl-predict --run-id 3f2a... --text "CC: chest pain ..."
    clinical-fl-predict --adapter ./adapter notes/*.txt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tasks.errors import TaskInputError
from tasks.model.predict import classify


def _adapter_from_run(run_id: str, tracking_uri: str | None) -> Path:
    import mlflow

    from fl_app.paths import project_root
    from tracking.run_tracker import default_store

    mlflow.set_tracking_uri(tracking_uri or default_store(project_root())[0])
    target = Path(tempfile.mkdtemp(prefix="adapter-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                        dst_path=str(target)))
    except Exception as err:  # MLflow raises several types for a missing run or artifact
        raise TaskInputError(f"run {run_id}: cannot fetch its 'adapter' artifact from "
                             f"{mlflow.get_tracking_uri()}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="folder with a saved adapter")
    source.add_argument("--run-id", help="MLflow run id whose 'adapter' artifact to use")
    parser.add_argument("--tracking-uri", help="MLflow store (default: <project>/mlruns)")
    parser.add_argument("--base-model", help="override the base model recorded with the adapter")
    parser.add_argument("--text", action="append", default=[], help="a note (repeatable)")
    parser.add_argument("files", nargs="*", help="text files, one note per file")
    args = parser.parse_args(argv)

    texts, names = list(args.text), [f"text {i + 1}" for i in range(len(args.text))]
    for name in args.files:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"cannot read {name}: {err}")
        names.append(name)
    if not texts:
        parser.error("give at least one --text or file")
    try:
        adapter = Path(args.adapter) if args.adapter else _adapter_from_run(args.run_id,
                                                                            args.tracking_uri)
        predictions = classify(adapter, texts, args.base_model)
    except TaskInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, prediction in zip(names, predictions, strict=True):
        print(f"{name}\t{prediction.label}\t{prediction.probability:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

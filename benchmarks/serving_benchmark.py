"""Prediction service benchmark: encrypted inference cost and agreement, plain throughput.

    .venv/bin/python benchmarks/serving_benchmark.py --run-id 183c667e...        # default data
    .venv/bin/python benchmarks/serving_benchmark.py --run-id da57f29e... \\
        --parquet ~/.cache/clinical-fl/ohsumed_ma5.parquet --limit 1000          # OHSUMED test

Starts a real ``clinical-fl-serve`` process on 127.0.0.1 (TLS, a token) for the run's
adapter and prints:
1. the encrypted part alone (encrypt + evaluate + decrypt, in this process), per note, by
   batch size, and the bytes a request carries per note;
2. agreement between encrypted predictions through the service and plain ones, over the
   test notes: share of equal labels, largest logit difference;
3. plain ``POST /predict`` notes per second at batch 1 (one client, and 8 concurrent clients,
   which the service batches together) and batch 32; what a note costs the client to encode
   (de-identification + encoder) for the encrypted path.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "benchmark-token-" + "5" * 32
SERVER_TEST_HOSPITAL = 10_000  # tasks/data/hospital_data.py's test hospital


def test_notes(args: argparse.Namespace, labels: list[str]) -> list[str]:
    if args.parquet:
        import pandas as pd

        table = pd.read_parquet(Path(args.parquet).expanduser())
        table = table[table["split"] == "test"]
        return table["text"].tolist()[:args.limit]
    from clinical_fl.settings.data import DataSettings
    from tasks.data.synthetic_notes import generate_hospital_notes

    settings = DataSettings()
    # The server's test hospital of the default data (tasks/data/hospital_data.py), with PHI:
    # the client de-identifies before encoding, the service before the plain model.
    notes = generate_hospital_notes(SERVER_TEST_HOSPITAL, settings.server_test_notes,
                                    settings.seed, label_skew_alpha=100.0,
                                    label_noise=settings.label_noise, labels=tuple(labels))
    return [n.text for n in notes][:args.limit]


def start_service(adapter: Path, folder: Path, max_batch: int) -> tuple[subprocess.Popen, str,
                                                                        Path]:
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(folder / "certs")],
                   check=True, capture_output=True)
    (folder / "tokens").write_text(TOKEN + "\n")
    port = 18000 + os.getpid() % 1000
    process = subprocess.Popen(
        [sys.executable, "-m", "clinical_fl.serving.cli", "--adapter", str(adapter),
         "--port", str(port),
         "--tls-cert", str(folder / "certs" / "superlink.pem"),
         "--tls-key", str(folder / "certs" / "superlink.key"), "--token-file",
         str(folder / "tokens"), "--max-batch", str(max_batch), "--max-notes", "1024"],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, ca = f"https://127.0.0.1:{port}", folder / "certs" / "ca.crt"
    import ssl

    trust = ssl.create_default_context(cafile=str(ca))
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", verify=trust, timeout=2).status_code == 200:
                return process, url, ca
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("the service did not come up")


def crypto_only(weight: np.ndarray, bias: np.ndarray, vectors: np.ndarray) -> None:
    from clinical_fl.serving.ckks_head import ClientKeys, EncryptedHead

    head = EncryptedHead(weight, bias)
    started = time.perf_counter()
    keys = ClientKeys(head.layout)
    galois = head.load_keys(keys.evaluation_keys)
    print(f"client keys: {time.perf_counter() - started:.2f} s to make and load, "
          f"{len(keys.evaluation_keys) / 1e6:.2f} MB uploaded once per client key")
    print("| batch | encrypt ms | evaluate ms | decrypt ms | ms per note | up B/note | "
          "down B/note |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 8, 32, 128):
        chunk = vectors[:batch]
        repeats = max(1, 128 // batch)
        t = np.zeros(3)
        for _ in range(repeats):
            t0 = time.perf_counter()
            blobs = keys.encrypt(chunk)
            t1 = time.perf_counter()
            answer = head.evaluate(blobs, galois)
            t2 = time.perf_counter()
            keys.decrypt(answer, len(chunk))
            t += [t1 - t0, t2 - t1, time.perf_counter() - t2]
        t = t / repeats * 1000
        print(f"| {len(chunk)} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | "
              f"{t.sum() / len(chunk):.2f} | {sum(map(len, blobs)) / len(chunk):,.0f} | "
              f"{sum(map(len, answer)) / len(chunk):,.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--parquet", help="a prepared table with text, label, split columns")
    parser.add_argument("--limit", type=int, default=400, help="test notes used")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()

    from clinical_fl.serving.client import EncryptedPredictor, ServiceClient
    from clinical_fl.serving.run_artifacts import download_adapter
    from tasks.model.predict import NoteClassifier

    adapter = download_adapter(args.run_id, args.tracking_uri)
    local = NoteClassifier(adapter)
    notes = test_notes(args, local.labels)
    print(f"run {args.run_id}: {len(notes)} test notes, labels {local.labels}, "
          f"torch threads {__import__('torch').get_num_threads()}")

    started = time.perf_counter()
    clean = local.deidentify(notes)
    deid_s = time.perf_counter() - started
    started = time.perf_counter()
    vectors, plain = local._run(clean, 32, vectors=True)
    encode_s = time.perf_counter() - started
    print(f"client side per note: de-identification {1000 * deid_s / len(notes):.1f} ms, "
          f"encoder {1000 * encode_s / len(notes):.1f} ms (batches of 32)")

    print("\n## Encrypted part alone (this process)")
    crypto_only(*local.head(), np.tile(vectors, (max(1, 128 // len(vectors) + 1), 1)))

    with tempfile.TemporaryDirectory() as folder:
        process, url, ca = start_service(adapter, Path(folder), args.max_batch)
        try:
            with ServiceClient(url, token=TOKEN, ca_cert=ca) as client:
                print("\n## Encrypted through the service (TLS), in requests of 32 notes")
                predictor = EncryptedPredictor(local, client)
                client.encrypted_logits(vectors[:1], local.fingerprint)  # keys uploaded once
                sent0, received0 = client.bytes_sent, client.bytes_received
                started = time.perf_counter()
                encrypted = np.concatenate([
                    client.encrypted_logits(vectors[i:i + 32], local.fingerprint)
                    for i in range(0, len(vectors), 32)])
                wall = time.perf_counter() - started
                del predictor
                agree = float((encrypted.argmax(1) == plain.argmax(1)).mean())
                print(f"{len(notes)} notes: {1000 * wall / len(notes):.2f} ms per note "
                      "(encrypt + HTTPS + evaluate + decrypt, no encoding); "
                      f"{(client.bytes_sent - sent0) / len(notes):,.0f} B up and "
                      f"{(client.bytes_received - received0) / len(notes):,.0f} B down per note")
                print(f"agreement with plain predictions: {100 * agree:.2f}% of {len(notes)} "
                      f"notes; largest logit difference {np.abs(encrypted - plain).max():.2e}")

                print("\n## Plain POST /predict (TLS, de-identification in the service)")
                for label, batch, clients in (("batch 1, one client", 1, 1),
                                              ("batch 1, 8 concurrent clients", 1, 8),
                                              ("batch 32, one client", 32, 1)):
                    chunks = [notes[i:i + batch] for i in range(0, min(len(notes), 256), batch)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=clients) as pool:
                        list(pool.map(client.predict, chunks))
                    wall = time.perf_counter() - started
                    count = sum(map(len, chunks))
                    print(f"{label}: {count / wall:.1f} notes/s ({count} notes, "
                          f"{1000 * wall / len(chunks):.0f} ms per request)")
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

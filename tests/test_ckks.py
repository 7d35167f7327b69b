"""CKKS building blocks (clinical_fl/secure_aggregation/ckks.py): key files, encryption,
homomorphic sum."""

from __future__ import annotations

import math
import multiprocessing
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from clinical_fl.secure_aggregation import ckks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ckks.generate_key_material(tmp_path_factory.mktemp("ckks") / "keys")


@pytest.fixture(scope="module")
def secret(keys) -> ts.Context:
    return ckks.load_secret_context(keys[0], "hospital 0")


@pytest.fixture(scope="module")
def public(keys) -> ts.Context:
    return ckks.load_public_context(keys[1].read_bytes(), "coordinator")


def test_round_trip_small_vectors(secret):
    rng = np.random.default_rng(1)
    for length in (0, 1, 100, 4097):
        vector = rng.uniform(-1, 1, length)
        ciphertexts = ckks.encrypt(secret, vector)
        assert len(ciphertexts) == math.ceil(length / 4096)
        decrypted = ckks.decrypt(secret, ciphertexts, length)
        assert decrypted.dtype == np.float64 and decrypted.shape == (length,)
        np.testing.assert_allclose(decrypted, vector, rtol=0, atol=1e-6)


def test_sum_of_three_parties_is_the_plain_sum(secret, public):
    rng = np.random.default_rng(2)
    vectors = [rng.normal(0, 0.05, 10_000) for _ in range(3)]
    encrypted = [ckks.encrypt(secret, vector) for vector in vectors]
    assert [len(party) for party in encrypted] == [3, 3, 3]  # ceil(10000 / 4096)
    total = ckks.add(public, encrypted)  # the coordinator's side: no secret key
    assert len(total) == 3
    np.testing.assert_allclose(ckks.decrypt(secret, total, 10_000), sum(vectors),
                               rtol=0, atol=1e-6)


def test_add_names_the_party_that_does_not_fit(secret, public):
    one, two = ckks.encrypt(secret, np.ones(10)), ckks.encrypt(secret, np.ones(5000))
    with pytest.raises(ValueError, match="party 2 sent 2 ciphertexts"):
        ckks.add(public, [one, one, two])
    with pytest.raises(ValueError, match="party 1's ciphertext 0 holds 9 values"):
        ckks.add(public, [one, ckks.encrypt(secret, np.ones(9))])
    with pytest.raises(ValueError, match="party 1's ciphertext 0 is not a CKKS vector"):
        ckks.add(public, [one, [b"garbage"]])


def test_the_public_context_cannot_decrypt_nor_carry_the_secret_key(secret, public, keys):
    assert not public.has_secret_key()
    ciphertexts = ckks.encrypt(public, np.arange(3.0))  # a public key can still encrypt
    with pytest.raises(ValueError, match="no secret key"):
        ckks.decrypt(public, ciphertexts, 3)
    np.testing.assert_allclose(ckks.decrypt(secret, ciphertexts, 3), [0, 1, 2], atol=1e-6)
    with pytest.raises(ckks.KeyMaterialError, match="coordinator: .*SECRET key"):
        ckks.load_public_context(keys[0].read_bytes(), "coordinator")
    with pytest.raises(ckks.KeyMaterialError, match="coordinator: .*not a TenSEAL context"):
        ckks.load_public_context(b"junk", "coordinator")



def test_public_bytes_hold_only_the_public_key(secret):
    reloaded = ts.context_from(ckks.public_bytes(secret))
    assert reloaded.has_public_key()
    assert not (reloaded.has_secret_key() or reloaded.has_galois_keys()
                or reloaded.has_relin_keys())


def test_fingerprint_is_stable_and_names_the_key(keys, tmp_path):
    secret_path, public_path = keys
    prints = {ckks.fingerprint(ckks.public_bytes(ckks.load_secret_context(secret_path, "h")))
              for _ in range(2)}
    assert prints == {ckks.fingerprint(public_path.read_bytes())}
    fingerprint = prints.pop()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    _, other = ckks.generate_key_material(tmp_path / "other")
    assert ckks.fingerprint(other.read_bytes()) != fingerprint


def test_describe_and_slots(secret, public):
    for context in (secret, public):
        assert ckks.describe(context) == \
            "CKKS N=8192, coefficient moduli 60/60 bits, scale 2^40"
        assert ckks.slots(context) == 4096


def _bfv_context_file(path: Path) -> None:
    context = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=1032193)
    path.write_bytes(context.serialize(save_secret_key=True))


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "does not exist"),
    ("public", "holds no secret key"),
    ("garbage", "is not a TenSEAL context"),
    ("bfv", "is a BFV context, not CKKS"),
    ("directory", "cannot be read"),
])
def test_load_secret_context_says_what_is_wrong(case, message, keys, tmp_path):
    path = {"missing": tmp_path / "nowhere.ctx", "public": keys[1],
            "garbage": tmp_path / "garbage.ctx", "bfv": tmp_path / "bfv.ctx",
            "directory": tmp_path}[case]
    if case == "garbage":
        path.write_bytes(b"not a key at all\n" * 50)
    if case == "bfv":
        _bfv_context_file(path)
    with pytest.raises(ckks.KeyMaterialError) as caught:
        ckks.load_secret_context(path, "hospital 2")
    text = str(caught.value)
    assert message in text and str(path) in text and "hospital 2" in text
    assert "deploy/ckks-keys.sh" in text  # how to fix it


def test_generate_refuses_to_overwrite_and_keeps_the_secret_private(keys):
    secret_path, public_path = keys
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    before = secret_path.read_bytes()
    with pytest.raises(ckks.KeyMaterialError, match="not overwritten"):
        ckks.generate_key_material(secret_path.parent)
    assert secret_path.read_bytes() == before
    assert sorted(p.name for p in secret_path.parent.iterdir()) == sorted(
        [ckks.PUBLIC_FILE, ckks.SECRET_FILE])  # no temporary files left behind


def test_unusable_parameters_write_nothing(tmp_path):
    too_many_bits = ckks.CkksParameters(poly_modulus_degree=4096)  # 200 bits > 109 for N=4096
    with pytest.raises(ckks.KeyMaterialError, match="not usable"):
        ckks.generate_key_material(tmp_path / "keys", too_many_bits)
    assert not (tmp_path / "keys").exists()


def _simulation_fingerprint(directory: Path, barrier, results, index: int) -> None:
    barrier.wait(timeout=60)  # all four ask at the same moment
    path = ckks.simulation_secret_context(directory)
    context = ckks.load_secret_context(path, f"process {index}")
    results.put(ckks.fingerprint(ckks.public_bytes(context)))


def test_simulation_key_is_made_once_across_processes(tmp_path):
    directory = tmp_path / "simulation" / "ckks"
    # spawn, not fork: TenSEAL contexts keep thread pools, which fork does not copy safely.
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(4), spawn.Queue()
    processes = [spawn.Process(target=_simulation_fingerprint,
                               args=(directory, barrier, results, index)) for index in range(4)]
    for process in processes:
        process.start()
    prints = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(set(prints)) == 1
    assert ckks.fingerprint((directory / ckks.PUBLIC_FILE).read_bytes()) == prints[0]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ckks.PUBLIC_FILE, ckks.SECRET_FILE])
    assert ckks.simulation_secret_context(directory) == directory / ckks.SECRET_FILE


def test_deploy_script_writes_both_files_once(tmp_path):
    out = tmp_path / "federation-keys"

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "deploy" / "ckks-keys.sh"), str(out)],
                              env=dict(os.environ), capture_output=True, text=True,
                              timeout=120, check=False)

    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    public = (out / ckks.PUBLIC_FILE).read_bytes()
    assert (out / ckks.SECRET_FILE).is_file()
    assert ckks.fingerprint(public) in first.stdout and "ckks-context=" in first.stdout
    second = run()
    assert second.returncode == 1 and "not overwritten" in second.stderr
    assert (out / ckks.PUBLIC_FILE).read_bytes() == public

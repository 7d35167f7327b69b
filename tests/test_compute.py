"""Device and precision: what auto picks and why, and a clear refusal before any work where
the machine lacks what the settings ask for."""

import pytest
import torch

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, task_settings_to_yaml
from clinical_fl.settings.train import Device, Precision, TrainSettings
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.model import compute as compute_module
from tasks.model.compute import ComputeUnavailableError, cpu_bf16_flags, resolve_compute
from tests.hospital_process import hospital_preflight
from tests.support import task

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _cpu_flags(monkeypatch, flags: list[str]) -> None:
    monkeypatch.setattr(compute_module, "cpu_bf16_flags", lambda: flags)


def test_cpuinfo_flags_name_the_native_bf16_instruction_sets(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_bf16_flags(cpuinfo) == ["avx512_bf16"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_bf16_flags(cpuinfo) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []


@no_cuda
def test_auto_picks_bf16_on_a_cpu_that_runs_it_natively_and_fp32_elsewhere(monkeypatch):
    _cpu_flags(monkeypatch, ["amx_bf16"])
    chosen = resolve_compute(TrainSettings())
    assert chosen.device.type == "cpu" and chosen.bf16
    assert "no CUDA device" in chosen.reason and "amx_bf16" in chosen.reason
    _cpu_flags(monkeypatch, [])
    chosen = resolve_compute(TrainSettings())
    assert not chosen.bf16 and "reports neither avx512_bf16 nor amx_bf16" in chosen.reason
    assert not resolve_compute(TrainSettings(precision=Precision.fp32)).bf16


def test_auto_on_a_gpu_trains_there_in_float32_unless_bf16_is_asked_for(monkeypatch):
    """Logic only (this test runs without a GPU): the H100 measurement is in benchmarks.md."""
    monkeypatch.setattr(compute_module, "cuda_available", lambda: True)
    monkeypatch.setattr(compute_module, "cuda_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Test GPU")
    chosen = resolve_compute(TrainSettings())
    assert chosen.device.type == "cuda" and not chosen.bf16
    assert "CUDA device Test GPU" in chosen.reason and "fp32 on CUDA" in chosen.reason
    assert resolve_compute(TrainSettings(precision=Precision.bf16)).bf16
    assert resolve_compute(TrainSettings(device=Device.cpu)).device.type == "cpu"
    monkeypatch.setattr(compute_module, "cuda_bf16", lambda: False)
    with pytest.raises(ComputeUnavailableError, match="Test GPU has no native bf16"):
        resolve_compute(TrainSettings(precision=Precision.bf16))


def test_bf16_where_the_hardware_lacks_it_is_refused_saying_what_the_machine_has(monkeypatch):
    _cpu_flags(monkeypatch, [])
    with pytest.raises(ComputeUnavailableError, match=r"train.precision=bf16, but the CPU .* "
                       r"reports neither avx512_bf16 nor amx_bf16 \(on cpu\)"):
        resolve_compute(TrainSettings(precision=Precision.bf16, device=Device.cpu))


@no_cuda
def test_cuda_on_a_machine_without_it_is_refused_before_the_model_loads(tiny_bert):
    with pytest.raises(ComputeUnavailableError, match="train.device=cuda, but this machine has "
                       "no CUDA device"):
        resolve_compute(TrainSettings(device=Device.cuda))
    settings = task(tiny_bert, "train.device=cuda", "model.name_or_path=/no/such/model")
    with pytest.raises(ComputeUnavailableError):  # not ModelNotFoundError: nothing loaded yet
        Hospital(settings, list(SPECIALTIES), 0, 2)


@no_cuda
def test_preflight_reports_the_hospital_that_lacks_the_device(tiny_bert, tmp_path):
    settings = task_settings_to_yaml(task(tiny_bert, "train.device=cuda"))
    status = hospital_preflight(settings, tmp_path, 1, {"partition-id": 1, "num-partitions": 2})
    assert status["problem"] == "4014 compute-unavailable key=train.device", status
    assert "train.device=cuda, but this machine has no CUDA device" in (
        tmp_path / "hospital.log").read_text()


def test_unknown_precision_and_device_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"train.precision.*'fp16'.*auto, fp32, bf16"):
        compose_config(["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"train.device.*'mps'.*\['auto', 'cpu', 'cuda'\]"):
        TrainSettings(device="mps")


def test_bf16_under_dp_sgd_needs_the_hooks_per_record_gradients():
    with pytest.raises(ConfigError, match="grad_sample_mode=ghost.*bf16 needs grad_sample_mode"):
        compose_config(["privacy=dp_sgd", "train.precision=bf16",
                        "privacy.dp_sgd.grad_sample_mode=ghost"])
    compose_config(["privacy=dp_sgd", "privacy.dp_sgd.grad_sample_mode=ghost"])  # auto: fp32

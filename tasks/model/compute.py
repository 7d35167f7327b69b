"""Where and in what arithmetic a model runs: the device (CPU or a CUDA GPU) and the precision
(float32, or bfloat16 autocast). ``auto`` takes bf16 where it was measured faster: on CPUs
with native bf16 instructions (about 2x); on CUDA it stays float32, which was faster for this
product's model sizes (``train.precision=bf16`` asks for it).

Master weights, optimizer state and every tensor exchanged with the server stay float32 on
whatever device: autocast only changes the arithmetic of the forward pass (and hence of the
backward), so an update is the same kind of object whatever a hospital's hardware is.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from clinical_fl.settings.train import Device, Precision, TrainSettings
from tasks.errors import TaskInputError

# Linux /proc/cpuinfo flags of CPUs with native bf16 matrix instructions.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class ComputeUnavailableError(TaskInputError):
    """The configured device or precision is not available on this machine."""


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 instruction sets this CPU reports (empty where it reports none, or
    where the OS has no /proc/cpuinfo: bf16 is then emulated, slower than float32)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in _NATIVE_BF16_FLAGS if flag in flags]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Compute:
    """A resolved device and precision, and why they were chosen."""

    device: torch.device
    bf16: bool
    reason: str

    @property
    def precision(self) -> Precision:
        return Precision.bf16 if self.bf16 else Precision.fp32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's arithmetic: bf16 autocast, or nothing at all."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def batches(self, loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
        """The loader's batches on this device."""
        for batch in loader:
            if self.device.type == "cpu":
                yield batch
            else:
                yield {key: value.to(self.device, non_blocking=True)
                       for key, value in batch.items()}

    def without_bf16(self, why: str) -> Compute:
        return Compute(self.device, False, f"{self.reason}; fp32: {why}") if self.bf16 else self

    def describe(self) -> str:
        return f"{self.device.type} {self.precision.value} ({self.reason})"


def _device(setting: Device) -> tuple[torch.device, str]:
    if setting == Device.cuda:
        if not cuda_available():
            raise ComputeUnavailableError(
                "train.device=cuda, but this machine has no CUDA device (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use "
                "train.device=cpu or auto", key="train.device")
        return torch.device("cuda"), f"train.device=cuda: {torch.cuda.get_device_name()}"
    if setting == Device.auto and cuda_available():
        return torch.device("cuda"), f"auto: CUDA device {torch.cuda.get_device_name()}"
    return torch.device("cpu"), ("train.device=cpu" if setting == Device.cpu
                                 else "auto: no CUDA device")


def _native_bf16(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        if cuda_bf16():
            return True, "the GPU runs bf16"
        return False, f"{torch.cuda.get_device_name()} has no native bf16"
    flags = cpu_bf16_flags()
    if flags:
        return True, f"the CPU has {'/'.join(flags)}"
    return False, (f"the CPU ({platform.processor() or platform.machine()}) reports neither "
                   f"{' nor '.join(_NATIVE_BF16_FLAGS)}")


def resolve_compute(settings: TrainSettings) -> Compute:
    """The device and precision ``settings`` ask for on this machine. Raises
    ComputeUnavailableError, before any work, where an explicit choice cannot be met."""
    device, device_reason = _device(settings.device)
    if settings.precision == Precision.fp32:
        return Compute(device, False, f"{device_reason}; train.precision=fp32")
    native, why = _native_bf16(device)
    if settings.precision == Precision.auto and device.type == "cuda":
        # Measured on an H100 (docs/benchmarks.md): with MiniLM at batch 16 the GPU waits on
        # kernel launches, and autocast's extra casts made training 0.76x and DP-SGD 0.37x
        # of float32. A bigger model or batch may gain from train.precision=bf16.
        return Compute(device, False, f"{device_reason}; auto: fp32 on CUDA ({why}, but "
                       "measured slower for small models)")
    if settings.precision == Precision.bf16 and not native:
        raise ComputeUnavailableError(
            f"train.precision=bf16, but {why} (on {device.type}); use train.precision=fp32 "
            "or auto", key="train.precision")
    label = "train.precision=bf16" if settings.precision == Precision.bf16 else "auto"
    return Compute(device, native, f"{device_reason}; {label}: {why}")


# What a caller that names no compute gets: the product's arithmetic before bf16 and GPUs.
CPU_FP32 = Compute(torch.device("cpu"), False, "float32 on the CPU")

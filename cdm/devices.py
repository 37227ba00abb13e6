"""The compute device a command runs on, checked before any work."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass

import torch

from cdm.errors import UserError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """A torch device this machine has; anything else is one clear error naming the value."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device name (expected cpu, cuda, cuda:N or mps)") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not available:
        raise UserError(
            f"--device {name}: this machine has no such device (available: {', '.join(devices())})"
        )
    return device


def devices() -> list[str]:
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


PRECISIONS = ("auto", "fp32", "bf16")


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run on native units here: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next tensor instead of handing it back to the kernel.

    A 1024 px activation (32-64 MiB) is above the largest size glibc serves from its heap, so by default
    each one is mapped afresh and every page of it faulted in, zeroed, and unmapped when freed: on a
    2-core CPU that took more time than the UNet's arithmetic. With mmap off and trimming at 2 GiB, freed
    blocks are reused. The process keeps its peak memory (0.9 GiB more for the demo cascade);
    the results are unchanged. Returns whether it applied: glibc on Linux only, once per process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@dataclass(frozen=True)
class Speed:
    """How the UNets run: autocast to `dtype` (None: fp32), in channels-last memory layout or not, and
    whether the process keeps freed memory for reuse (`keep_freed_memory`). None changes a stored weight
    or a result's meaning; `Speed.exact()` is what plain diffusers does with the same folder."""

    dtype: torch.dtype | None = None
    channels_last: bool = False
    keep_memory: bool = False

    @classmethod
    def exact(cls) -> Speed:
        return cls()

    @classmethod
    def resolve(cls, precision: str, device: torch.device, exact: bool = False) -> Speed:
        """`auto`: bf16 where `device` has bf16 units, fp32 elsewhere; channels-last on CPU, where oneDNN's
        convolutions are faster in it. `exact` pins fp32 and the default layout."""
        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
        if exact:
            if precision == "bf16":
                raise UserError("--exact runs in fp32, as plain diffusers does: drop --precision bf16")
            return cls.exact()
        bf16 = precision == "bf16" or (precision == "auto" and has_fast_bf16(device))
        on_cpu = device.type == "cpu"
        return cls(torch.bfloat16 if bf16 else None, channels_last=on_cpu, keep_memory=on_cpu)

    def apply(self, pipe) -> None:
        """Put the pipeline's UNets (the main one, and a guide where there is one) in this layout, and keep
        freed memory where asked (a setting of the whole process, which stays)."""
        if self.keep_memory:
            keep_freed_memory()
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        for name in ("unet", "guide_unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=layout)

    def autocast(self, device: torch.device):
        dtype = self.dtype or torch.float32
        return torch.autocast(device.type, dtype=dtype, enabled=self.dtype is not None)

    def describe(self) -> str:
        precision = "bf16 autocast" if self.dtype is not None else "fp32"
        layout = f"{'channels-last' if self.channels_last else 'default'} layout"
        return f"{precision}, {layout}" + (", freed memory kept" if self.keep_memory else "")


def training_precision(name: str) -> str:
    """accelerate's mixed_precision for a train.mixed_precision setting: `auto` becomes bf16 where the
    device this process trains on has bf16 units, and no (fp32) elsewhere, where bf16 would be emulated."""
    if name != "auto":
        return name
    return "bf16" if has_fast_bf16(torch.device(default_device())) else "no"

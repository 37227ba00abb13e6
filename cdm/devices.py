"""The compute device a command runs on, checked before any work."""

from __future__ import annotations

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

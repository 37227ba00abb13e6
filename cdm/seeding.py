"""Seeds derived from one user seed: every random stream of training and sampling is a pure function
of (seed, where it is used), so resumed runs and single images repeat exactly."""

from __future__ import annotations

import torch


def derived_seed(seed: int, primary: int, secondary: int = 0, weight: int = 7_919) -> int:
    """A 63-bit seed for stream (primary, secondary) of `seed`: sampling stage k, training step and
    rank, or data epoch and example index."""
    return (seed * 1_000_003 + primary * weight + secondary) % (2**63 - 1)


def generator(seed: int, primary: int, secondary: int = 0, weight: int = 7_919) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, primary, secondary, weight))

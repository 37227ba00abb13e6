"""Image helpers: tensors in [-1, 1] to PIL, grids without torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def to_pil(x: torch.Tensor) -> PIL.Image.Image:
    """(3, H, W) tensor in [-1, 1] -> 8-bit RGB image."""
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return PIL.Image.fromarray(array.permute(1, 2, 0).numpy())


def make_grid(images: list[torch.Tensor], ncols: int, pad: int = 2) -> PIL.Image.Image:
    """Tile images (resized to the largest) into rows of `ncols` with a white border."""
    size = max(max(i.shape[-2:]) for i in images)
    tiles = [F.interpolate(i[None].float(), size=(size, size), mode="nearest")[0] if i.shape[-1] != size else i
             for i in images]  # fmt: skip
    nrows = -(-len(tiles) // ncols)
    grid = np.full((nrows * (size + pad) + pad, ncols * (size + pad) + pad, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        grid[y : y + size, x : x + size] = np.asarray(to_pil(tile))
    return PIL.Image.fromarray(grid)


def save_grid(images: list[torch.Tensor], path: Path, ncols: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, ncols).save(path)
    return path

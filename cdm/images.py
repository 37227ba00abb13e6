"""Image helpers: PIL to and from tensors, grids without torchvision.

Every image tensor outside a model is (3, H, W) or (N, 3, H, W) in [0, 1], the range the pipelines take
and return (`output_type="pt"`); [-1, 1] is the models' own space, used only inside the pipelines and the
training loss.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F


def to_pil(x: torch.Tensor) -> PIL.Image.Image:
    """(3, H, W) tensor in [0, 1] (a pipeline's "pt" output) -> 8-bit RGB, rounded exactly as the
    pipelines round their "pil" output, so a file cdm writes equals what plain diffusers returns."""
    array = x.detach().clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    return PIL.Image.fromarray((array * 255).round().astype("uint8"))


def make_grid(images: list[torch.Tensor], ncols: int, pad: int = 2) -> PIL.Image.Image:
    """Tile images (resized to the largest) into rows of `ncols` with a white border."""
    size = max(max(i.shape[-2:]) for i in images)
    tiles = [
        F.interpolate(i[None].float(), size=(size, size), mode="nearest")[0] if i.shape[-1] != size else i
        for i in images
    ]
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


def labelled(image: PIL.Image.Image, text: str, height: int = 22) -> PIL.Image.Image:
    """The image with a white caption strip on top."""
    from PIL import ImageDraw

    out = PIL.Image.new("RGB", (image.width, image.height + height), "white")
    out.paste(image, (0, height))
    ImageDraw.Draw(out).text((6, 5), text, fill="black")
    return out


def comparison_figure(rows: list[dict[str, torch.Tensor]], zoom: int = 4, pad: int = 6) -> PIL.Image.Image:
    """Columns side by side per row (each a (3, H, W) tensor of one size), and under each row a zoomed centre crop.

    `rows` maps a column title to its image; every row must have the same titles.
    """
    strips = []
    for row in rows:
        full = [labelled(to_pil(x), title) for title, x in row.items()]
        h, w = next(iter(row.values())).shape[-2:]
        ch, cw = h // zoom, w // zoom
        top, left = (h - ch) // 2, (w - cw) // 2
        crops = []
        for title, x in row.items():
            crop = to_pil(x[:, top : top + ch, left : left + cw]).resize(
                (cw * zoom, ch * zoom), PIL.Image.NEAREST
            )
            crops.append(labelled(crop, f"{title}, centre x{zoom}"))
        for line in (full, crops):
            strip = PIL.Image.new(
                "RGB", (sum(i.width for i in line) + pad * (len(line) - 1), line[0].height), "white"
            )
            for k, image in enumerate(line):
                strip.paste(image, (k * (image.width + pad), 0))
            strips.append(strip)
    figure = PIL.Image.new(
        "RGB", (max(s.width for s in strips), sum(s.height + pad for s in strips)), "white"
    )
    y = 0
    for strip in strips:
        figure.paste(strip, (0, y))
        y += strip.height + pad
    return figure


# What PIL raises on a file that is not a readable image (truncated, corrupt, or another format).
UNREADABLE = (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError)


def open_image(record) -> PIL.Image.Image:
    """Open and load an undecoded `datasets` image, turned upright by its EXIF orientation (as viewers show it)."""
    raw = record.get("bytes") if isinstance(record, dict) else None
    source = io.BytesIO(raw) if raw else record["path"]
    image = PIL.Image.open(source)
    image.load()
    return PIL.ImageOps.exif_transpose(image)


def decode_image(record) -> PIL.Image.Image:
    """Decode an undecoded `datasets` image; RGBA is composited on white and grey becomes RGB."""
    return to_rgb(open_image(record))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, high-bit-depth grey scaled to 0..255."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float grey
        image = PIL.Image.fromarray(to_8bit(np.asarray(image), image.mode))
    return image.convert("RGB")


def to_8bit(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth grey image to 0..255: 16-bit by 65535, float by 1 (or its peak if above 1)."""
    array = array.astype(np.float64)
    if mode == "F":
        peak = 1.0 if array.max(initial=0) <= 1.0 else array.max()
    else:
        peak = 65535.0 if array.max(initial=0) <= 65535 else array.max()
    return (np.clip(array / peak, 0, 1) * 255).round().astype(np.uint8)


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def centre_crop(x: torch.Tensor, size: int, multiple: int) -> torch.Tensor:
    """The centre crop of at most size x size whose sides are multiples of `multiple`."""
    h, w = (min(size, n) // multiple * multiple for n in x.shape[-2:])
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]

"""The held-out images that cdm-eval and the experiments score against, in [0, 1].

Labelled sets (digits, a labelled imagefolder) come at one size, spread over the classes; photos come
as crops of one size or whole, at their native resolution.
"""

from __future__ import annotations

import sys

import torch

from cdm.config import DataConfig, DataSource, ResizeMode
from cdm.errors import UserError
from cdm.images import UNREADABLE, decode_image, to_tensor
from cdm.train.data import StageDataset, collate, open_dataset

DEFAULT_RESIZE = {"digits": ResizeMode.crisp, "photos": ResizeMode.none, "imagefolder": ResizeMode.resize}


def data_config(source: str, path: str | None, sr: bool = False) -> DataConfig:
    """The held-out data: for SR, any folder of images at native resolution (no labels needed)."""
    if source == "imagefolder" and not path:
        raise UserError("--data imagefolder needs --data-path DIR")
    label = None if source == "photos" or sr else "label"
    resize = ResizeMode.none if sr and source == "imagefolder" else DEFAULT_RESIZE[source]
    return DataConfig(source=DataSource(source), path=path, resize=resize, label_column=label)


def real_images(data: DataConfig, split: str, size: int, limit: int | None, seed: int = 0):
    """Held-out images at `size` (rendered, resized or cropped as the data's mode says) in [0, 1]."""
    crop = size if data.resize == ResizeMode.none else 0
    ds, label_col, _ = open_dataset(data, split)
    items = StageDataset(ds, data, label_col, (size, crop), seed)
    n = len(items) if limit is None else min(limit, len(items))
    picks = torch.linspace(0, len(items) - 1, n).round().long().tolist() if n else []  # spread over classes
    batch = collate([items[(0, i)] for i in picks])
    if batch["images"] is None and batch["skipped_corrupt"] == len(picks):
        raise UserError(
            f"none of the {len(picks)} {split} images of {data.source.value} could be read (corrupt?)"
        )
    if batch["images"] is None:
        raise UserError(
            f"no {split} image of {data.source.value} is at least {size}x{size}"
            f"{unreadable_note(batch['skipped_corrupt'])}: pass a smaller --crop"
        )
    warn_unreadable(batch["skipped_corrupt"])
    return batch["images"], batch["labels"]


def whole_images(data: DataConfig, split: str, multiple: int, limit: int | None) -> list[torch.Tensor]:
    """Held-out images at native size, each cropped to a multiple of `multiple`, as (1, 3, H, W) in [0, 1]."""
    ds, _, _ = open_dataset(data, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    images, unreadable = [], []
    for i in torch.linspace(0, len(ds) - 1, n).round().long().tolist() if n else []:
        record = ds[i][data.image_column]
        try:
            x = to_tensor(decode_image(record))[None]
        except UNREADABLE:  # measure the others; say which were left out
            unreadable.append(str(record.get("path") or f"#{i}"))  # undecoded: {"bytes", "path"}
            continue
        h, w = x.shape[-2] // multiple * multiple, x.shape[-1] // multiple * multiple
        if h and w:
            images.append(x[..., :h, :w])
    if unreadable and len(unreadable) == n:  # not one could be read (a small one is another error)
        raise UserError(
            f"{unreadable[0]}: not a readable image, nor any other {split} image of {data.source.value}"
        )
    if not images:
        raise UserError(
            f"no {split} image of {data.source.value} is at least {multiple}x{multiple} pixels"
            f"{unreadable_note(len(unreadable))}"
        )
    warn_unreadable(len(unreadable), unreadable)
    return images


def unreadable_note(count: int) -> str:
    """For an error about the images that were read: how many others could not be."""
    return f" ({count} more could not be read)" if count else ""


def warn_unreadable(count: int, names: list[str] = ()) -> None:
    """One warning line for held-out images that could not be decoded, naming up to three."""
    if count:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        print(
            f"warning: skipped {count} unreadable image(s) (corrupt or not images){': ' + shown if shown else ''}",
            file=sys.stderr,
        )

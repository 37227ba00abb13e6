"""Training data through `datasets`: imagefolders, Hub datasets, and the offline sets of `builders`.

Randomness is a pure function of (seed, epoch, index) for crops and of the step for the
batch order, so a resumed run reads exactly the data it would have read, with no RNG state
to save.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from cdm.config import DataConfig, DataSource, ResizeMode
from cdm.errors import UserError
from cdm.images import UNREADABLE, decode_image, to_tensor
from cdm.seeding import generator
from cdm.train.builders import (
    DEBIAN_VERSION,
    PHOTOS_VERSION,
    build_digits,
    build_photo_folder,
    build_photos,
    cache_root,
)
from cdm.train.degradations import random_crop_box, render_crisp


def dataset_root(data: DataConfig) -> Path | None:
    if data.source == DataSource.digits:
        return build_digits(Path(data.path) if data.path else cache_root() / "digits")
    if data.source == DataSource.photos and data.debian_photos:
        default = cache_root() / f"photos-v{PHOTOS_VERSION}-debian-v{DEBIAN_VERSION}-{data.holdout}"
        return build_photo_folder(Path(data.path) if data.path else default, holdout=data.holdout)
    if data.source == DataSource.photos:
        return build_photos(
            Path(data.path) if data.path else cache_root() / f"photos-v{PHOTOS_VERSION}-{data.holdout}",
            data.holdout,
        )
    if data.source == DataSource.imagefolder:
        root = Path(data.path)
        if not root.is_dir():
            raise UserError(f"data.path={data.path}: no such folder (expected one sub-folder per class)")
        return root
    return None


def open_dataset(data: DataConfig, split: str | None = None):
    """The raw `datasets` dataset (images not decoded) and its id -> label map."""
    import datasets

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    split = split or data.split
    root = dataset_root(data)
    ds = load_raw(data, split, root)
    features = ds.features or {}
    if not features and isinstance(ds, datasets.IterableDataset):
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise UserError(f"data: {data.name or root} is empty")
        features = dict.fromkeys(first)
    if data.image_column not in features:
        raise UserError(
            f"data.image_column={data.image_column!r} is not a column: expected one of {list(features)}"
        )
    ds = ds.cast_column(data.image_column, datasets.Image(decode=False))
    label_col, id2label = label_map(ds, features, data, root)
    return ds, label_col, id2label


def load_raw(data: DataConfig, split: str, root: Path | None):
    """`load_dataset` for an offline set or imagefolder (root), a saved dataset, or a Hub/builder name."""
    import datasets

    try:
        if root is not None:
            has_splits = (root / "train").is_dir() or (root / split).is_dir()
            if has_splits and not (root / split).is_dir():
                raise UserError(f"{root} has no {split}/ folder: expected {root / split}")
            ds = datasets.load_dataset(
                "imagefolder",
                data_dir=str(root / split if has_splits else root),
                split="train",
                streaming=data.streaming,
            )
        elif is_saved_dataset(data.name):
            ds = load_saved(data.name, split, data.streaming)
        else:
            files = list(data.data_files) if data.data_files else None
            ds = datasets.load_dataset(
                data.name, data.config_name, data_files=files, split=split, streaming=data.streaming
            )
    except ValueError as err:
        if "corresponds to no data" in str(err) or "no data" in str(err).lower():
            raise UserError(
                f"data: {data.path or data.name} holds no images (PNG, JPEG, ...) for split {split}"
            ) from None
        raise
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ConnectionError) as err:
        raise UserError(
            f"data: could not open {data.name or root} ({str(err).splitlines()[0][:200]})"
        ) from None
    return ds


def label_map(ds, features, data: DataConfig, root: Path | None) -> tuple[str | None, dict]:
    """The label column (None without one) and the id -> name map: class names, labels.json, or ids."""
    id2label = {0: "image"}
    label_col = data.label_column if data.label_column in features else None
    if data.label_column and label_col is None and data.source in (DataSource.imagefolder, DataSource.hub):
        one_class = " (a folder with one class has no label column: pass data.label_column=null)"
        raise UserError(
            f"data.label_column={data.label_column!r} is not a column: expected one of {list(features)}"
            + (one_class if data.source == DataSource.imagefolder else "")
        )
    if label_col is not None:
        names = getattr(features[label_col], "names", None)
        if names:
            id2label = dict(enumerate(names))
        else:  # integer labels without names (a Value column, not a ClassLabel)
            id2label = {i: str(i) for i in range(count_classes(ds, label_col, data))}
    if root is not None and (root / "labels.json").is_file():
        id2label = {int(k): v for k, v in json.loads((root / "labels.json").read_text()).items()}
    return label_col, id2label


def is_saved_dataset(name: str | None) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    root = Path(name) if name else None
    return bool(
        root and root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file())
    )


def load_saved(name: str, split: str, streaming: bool):
    """`load_from_disk` for a saved Dataset (any split name reads it) or a saved DatasetDict (the split)."""
    import datasets

    saved = datasets.load_from_disk(name)
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(f"data.split={split}: {name} holds the splits {sorted(saved)}")
        saved = saved[split]
    return saved.to_iterable_dataset() if streaming else saved


def count_classes(ds, label_col: str, data: DataConfig) -> int:
    """The class count of integer labels: data.num_classes, else max + 1 over the whole (map-style) set."""
    if data.num_classes:
        return data.num_classes
    if not hasattr(ds, "__len__"):
        raise UserError(
            f"data.label_column={label_col!r} holds integers without class names: pass data.num_classes=N "
            "for a streamed dataset"
        )
    values = ds.select_columns([label_col])[label_col] if len(ds) else []
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise UserError(f"data.label_column={label_col!r} has the label {bad[0]!r}: expected integers >= 0")
    return max(values, default=0) + 1


def random_scaled_crop(
    image: PIL.Image.Image, size: int, min_scale: float, max_scale: float, generator
) -> PIL.Image.Image:
    """A random crop of the image downscaled by a factor ~ U[min_scale, max_scale] (SR scale augmentation).

    Crops size / scale source pixels and resizes them to `size` with anti-aliased bicubic, which
    equals cropping the downscaled image but costs only the crop. An image too small for the drawn
    scale is downscaled less.
    """
    u = float(torch.rand((), generator=generator))
    side = min(round(size / (min_scale + (max_scale - min_scale) * u)), *image.size)
    top, left = random_crop_box(image.height, image.width, side, generator)
    crop = image.crop((left, top, left + side, top + side))
    return crop if side == size else crop.resize((size, size), PIL.Image.BICUBIC, reducing_gap=None)


def random_flip_rot90(x: torch.Tensor, flip: bool, rot90: bool, generator) -> torch.Tensor:
    """The dihedral augmentations of SR training: a horizontal flip and a turn by k * 90 degrees."""
    draws = torch.randint(0, 4, (2,), generator=generator).tolist()
    if flip and draws[0] % 2:
        x = x.flip(-1)
    if rot90 and draws[1]:
        x = torch.rot90(x, draws[1], dims=(-2, -1))
    return x


@dataclass
class Preprocess:
    """Image -> a training target in [0, 1]: resize or re-render to `resolution`, optionally rescale, then a
    crop of `size` (`crop_size`, or the whole `resolution` when it is 0)."""

    resolution: int
    crop_size: int
    mode: ResizeMode
    min_scale: float = 1.0
    max_scale: float = 1.0
    flip: bool = False
    rot90: bool = False

    @property
    def size(self) -> int:
        return self.crop_size or self.resolution

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator) -> torch.Tensor | None:
        res = self.resolution
        if self.mode == ResizeMode.crisp:
            grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
            x = render_crisp(grey[None, None], res)[0].expand(3, -1, -1)
        else:
            if self.mode == ResizeMode.resize:
                scale = res / min(image.size)
                new = (max(res, round(image.width * scale)), max(res, round(image.height * scale)))
                image = image.resize(new, PIL.Image.BICUBIC, reducing_gap=None)
            if self.min_scale < 1 and min(image.size) >= self.size:
                image = random_scaled_crop(image, self.size, self.min_scale, self.max_scale, generator)
            x = to_tensor(image)
        h, w = x.shape[-2:]
        if h < self.size or w < self.size:
            return None
        top, left = random_crop_box(h, w, self.size, generator)
        x = x[:, top : top + self.size, left : left + self.size]
        if self.flip or self.rot90:
            x = random_flip_rot90(x, self.flip, self.rot90, generator)
        return x.contiguous()


SMALL_DATASET = 64  # map-style sets up to this many images keep their decoded images in memory


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return generator(seed, epoch, index)


class StageDataset(torch.utils.data.Dataset):
    """Map-style view of a `datasets` dataset; items are addressed by (epoch, index)."""

    def __init__(self, ds, data: DataConfig, label_col: str | None, size: tuple[int, int], seed: int):
        """`size` is (resolution, crop_size): images are brought to `resolution`, then cropped to
        `crop_size` (0: not cropped further), as `StageConfig` names them."""
        self.ds, self.data, self.label_col, self.seed = ds, data, label_col, seed
        self._decoded: dict[int, PIL.Image.Image] = {}
        self.pre = Preprocess(
            *size,
            ResizeMode(data.resize),
            min_scale=data.min_scale,
            max_scale=data.max_scale,
            flip=data.random_flip,
            rot90=data.random_rot90,
        )

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, index = key
        if len(self.ds) <= SMALL_DATASET:  # a few large photos: decode each once, not once per crop
            return self.example(self.ds[int(index)], example_generator(self.seed, epoch, index), index)
        return self.example(self.ds[int(index)], example_generator(self.seed, epoch, index))

    def example(self, row: dict, generator: torch.Generator, cache_key: int | None = None) -> dict:
        label = int(row[self.label_col]) if self.label_col else 0
        try:
            if cache_key is None:
                image = decode_image(row[self.data.image_column])
            else:
                if cache_key not in self._decoded:
                    self._decoded[cache_key] = decode_image(row[self.data.image_column])
                image = self._decoded[cache_key]
        except UNREADABLE:
            return {"image": None, "label": label, "reason": "corrupt"}
        x = self.pre(image, generator)
        return {"image": x, "label": label, "reason": None if x is not None else "small"}

    def head(self, n: int) -> list[dict]:
        """The first `n` raw records, in storage order."""
        return [self.ds[i] for i in range(min(n, len(self.ds)))]


class StreamingStageDataset(torch.utils.data.IterableDataset):
    """Training examples from a streamed `datasets.IterableDataset`, for one rank, epoch after epoch.

    Each epoch reshuffles (shard order and a buffer of `buffer_size` records, seeded by seed and
    epoch). Ranks read disjoint parts (`split_dataset_by_node`) and DataLoader workers split the
    shards between them. A run resumed at micro-step `start` skips, undecoded, the records this
    rank (and each worker) had consumed. With `num_workers=0` the resumed run then reads exactly the
    batches an uninterrupted run would; with workers, the same records, though batches of different
    workers may come in another order.
    """

    def __init__(
        self,
        ds,
        data: DataConfig,
        label_col: str | None,
        size: tuple[int, int],
        seed: int,
        batch_size: int = 1,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        buffer_size: int = 1000,
    ):
        from datasets.distributed import split_dataset_by_node

        self.raw = ds
        self.ds = split_dataset_by_node(
            ds.shuffle(seed=seed, buffer_size=buffer_size), rank=rank, world_size=world
        )
        self.view = StageDataset(ds, data, label_col, size, seed)
        self.seed, self.batch_size, self.start = seed, batch_size, start

    @property
    def data(self) -> DataConfig:
        return self.view.data

    @property
    def pre(self) -> Preprocess:
        return self.view.pre

    def records(self):
        """(epoch, position, record) for ever; positions count across epochs. Ends if an epoch is empty."""
        epoch, position = 0, 0
        while True:
            self.ds.set_epoch(epoch)
            before = position
            for row in self.ds:
                yield epoch, position, row
                position += 1
            if position == before:
                return
            epoch += 1

    def records_to_skip(self) -> int:
        info = torch.utils.data.get_worker_info()
        # `datasets` stops the workers beyond the shard count; the loader takes turns over the rest
        workers, worker = (min(info.num_workers, self.ds.num_shards), info.id) if info is not None else (1, 0)
        return len(range(worker, self.start, workers)) * self.batch_size  # batches this worker produced

    def __iter__(self):
        skip = self.records_to_skip()
        for epoch, position, row in self.records():
            if position < skip:
                continue
            yield self.view.example(row, example_generator(self.seed, epoch, position))

    def first_examples(self, n: int) -> list[dict]:
        """The first `n` examples of the unshuffled stream (fixed inputs for sample grids)."""
        return [
            self.view.example(row, example_generator(self.seed, 0, i)) for i, row in enumerate(self.head(n))
        ]

    def head(self, n: int) -> list[dict]:
        return list(self.raw.take(n))


class IndexStream(torch.utils.data.Sampler):
    """Batches of (epoch, index) for this rank, starting at micro-step `start`; a new permutation each epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = (
            n,
            batch_size,
            seed,
            rank,
            world,
            start,
        )
        self._perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            }
        return self._perms[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world + self.rank) * self.batch_size
        positions = range(first, first + self.batch_size)
        return [(p // self.n, int(self.perm(p // self.n)[p % self.n])) for p in positions]

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


def collate(items: list[dict]) -> dict:
    """Stack valid examples; count the ones skipped as corrupt or smaller than the crop."""
    good = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "labels": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "skipped_corrupt": sum(it["reason"] == "corrupt" for it in items),
        "skipped_small": sum(it["reason"] == "small" for it in items),
    }


def check_images_fit(dataset: StageDataset | StreamingStageDataset, probe: int = 32) -> None:
    """Fail early, with one line, when none of the first images can give a training example."""
    records = dataset.head(probe)
    n = len(records)
    if n == 0:
        raise UserError("data: the dataset is empty")
    sizes, ok = [], 0
    for i, row in enumerate(records):
        try:
            image = decode_image(row[dataset.data.image_column])
        except UNREADABLE:
            continue
        sizes.append(image.size)
        ok += dataset.pre(image, example_generator(0, 0, i)) is not None
    if not sizes:
        raise UserError(f"data: the first {n} images could not be decoded (corrupt or not images)")
    if ok == 0:
        w, h = max(sizes, key=lambda s: min(s))
        size = dataset.pre.size
        key = "stage.crop_size" if dataset.pre.crop_size else "stage.resolution"
        raise UserError(
            f"{key}={size} is larger than the images (largest of the first {n}: {w}x{h}): "
            f"expected a crop of at most {min(w, h)}"
        )

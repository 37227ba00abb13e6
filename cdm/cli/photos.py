"""Write the larger photo set (the wheels' photos plus Debian's background photographs) as one imagefolder.

    OUT/train/photo/   the wheels' training photos and the Debian photos
    OUT/test/photo/    the wheels' held-out photos (the same as data=photos' test split)

    python -m cdm.cli.photos OUT      (then: cdm-train ... data=imagefolder data.path=OUT)

`cdm-train experiment=photo_sr4x data.debian_photos=true` builds the same folder in the cache by itself.
"""

from __future__ import annotations

from pathlib import Path

from cdm.cli.arguments import OneLineParser
from cdm.errors import cli
from cdm.train.builders import build_photo_folder


@cli
def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m cdm.cli.photos", description=__doc__.splitlines()[0])
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

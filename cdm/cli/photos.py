"""Write the larger photo set (the wheels' photos plus Debian's training photographs) as one imagefolder.

    OUT/train/photo/   the wheels' training photos and 15 photographs of Debian's lomiri-wallpapers packages
    OUT/test/photo/    the wheels' held-out photos (the same as data=photos' test split)

    python -m cdm.cli.photos OUT      (then: cdm-train ... data=imagefolder data.path=OUT)

With --eval-splits, 256 px crops of photographs no shipped stage trained on, for judging photo SR:

    OUT/validation/photo/   every other photograph of Debian's mate-backgrounds and
                            plasma-workspace-wallpapers, and the wheels' three held-out photos
    OUT/test/photo/         the other photographs of those two packages: for final figures only

No photo is in more than one of train, validation and test.

    python -m cdm.cli.photos OUT --eval-splits
    cdm-eval sr --data imagefolder --data-path OUT --split validation --crop 0

`cdm-train experiment=photo_sr4x data.debian_photos=true` builds the same folder in the cache by itself.
"""

from __future__ import annotations

from pathlib import Path

from cdm.cli.arguments import OneLineParser
from cdm.errors import cli
from cdm.train.builders import build_photo_eval_splits, build_photo_folder


@cli
def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m cdm.cli.photos", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the imagefolder to write (kept as it is if it is complete)")
    p.add_argument(
        "--debs", type=Path, default=None, help="where the .deb files are kept (default: the cdm cache)"
    )
    p.add_argument(
        "--eval-splits",
        action="store_true",
        help="write validation and test crops of photos no shipped stage trained on, instead",
    )
    args = p.parse_args(argv)
    if args.eval_splits:
        root = build_photo_eval_splits(args.out, args.debs)
        counts = {s: len(list((root / s / "photo").glob("*.png"))) for s in ("validation", "test")}
        print(f"{root}: {counts['validation']} validation crops, {counts['test']} test crops")
        return
    root = build_photo_folder(args.out, args.debs)
    counts = {split: len(list((root / split / "photo").glob("*.png"))) for split in ("train", "test")}
    print(f"{root}: {counts['train']} training photos, {counts['test']} held out")


if __name__ == "__main__":
    main()

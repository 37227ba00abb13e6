"""Generated bad inputs, not a list: random bad numbers for every numeric flag of the sampling CLIs,
random wrong JSON in every field of a model folder, and random files of the user's in the output
folder. Every case must exit 2 with one line on stderr, no traceback, and leave every file that was
there byte for byte as it was. The CLIs run in this process (one model load each), so hundreds of
cases fit in a minute or two; the seed is fixed, so a failure repeats."""

import io
import json
import os
import random
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import make_cascade
from test_data_safety import tree_hashes

from cdm.cli import eval as eval_cli
from cdm.cli import generate as generate_cli
from cdm.cli import upscale as upscale_cli

SEED = 20261207
BAD_NUMBERS = [
    "nan",
    "inf",
    "-inf",
    "1e400",
    "-1",
    "-0.5",
    "abc",
    "",
    "1e30",
    "99999999999999999999999",
    "0x10",
]
# flag -> the values that must be refused (every bad number, plus the flag's own out-of-range values)
GENERATE_FLAGS = {
    "--steps": BAD_NUMBERS + ["0", "2.5", "100000"],
    "--guidance": BAD_NUMBERS + ["0", "0.5", "101"],
    "--noise-level": BAD_NUMBERS + ["1000", "5000", "1.5"],
    "--num-images": BAD_NUMBERS + ["0", "100001"],
    "--seed": BAD_NUMBERS[:4] + ["-1", "-0.5", "abc", "", "99999999999999999999999", str(2**63)],
    "--stages": BAD_NUMBERS + ["0", "9"],
}
UPSCALE_FLAGS = {
    "--steps": BAD_NUMBERS + ["0", "100000"],
    "--noise-level": BAD_NUMBERS + ["1000", "5000"],
    "--tile": BAD_NUMBERS + ["0"],
    "--overlap": BAD_NUMBERS + ["100000"],
    "--seed": ["-1", "abc", "", "99999999999999999999999", "nan"],
    "--autoguidance": BAD_NUMBERS + ["0", "0.5", "2", "101"],
    "--held-out": ["-1", "abc", "nan", "100000"],
    "--detail-threshold": BAD_NUMBERS + ["1.5", "2"],
}
EVAL_FLAGS = {
    "--noise-level": BAD_NUMBERS + ["1000"],
    "--blur": BAD_NUMBERS[:4] + ["-1", "5"],
    "--jpeg": ["-1", "96", "abc", "nan"],
    "--tile": BAD_NUMBERS + ["3", "7"],
    "--eta": BAD_NUMBERS[:4] + ["-1", "2"],
    "--num-images": ["0", "-1", "abc", "nan"],
    "--steps": BAD_NUMBERS + ["100000", "1.5"],
    "--detail-threshold": BAD_NUMBERS + ["1.5"],
}
# wrong JSON for the fields of a stage folder, by file
WRONG_VALUES = [None, "x", -1, 0, 1e30, 10**30, [], {}, [1, 2], True, {"a": 1}]
FIELDS = {
    "cascade.json": ["stages", "label_set"],
    "sr64to256/model_index.json": [
        "low_res_size",
        "id2label",
        "residual_scale",
        "call_defaults",
        "unet",
        "scheduler",
        "_class_name",
    ],
    "base64/model_index.json": ["id2label", "call_defaults", "unet", "_class_name"],
    "base64/unet/config.json": ["sample_size", "block_out_channels", "num_class_embeds", "in_channels"],
    "sr64to256/unet/config.json": ["sample_size", "block_out_channels", "time_cond_proj_dim"],
    "sr64to256/cdm_stage.json": ["stage", "run"],
}
SAMPLING = [
    "steps",
    "guidance_scale",
    "noise_level",
    "aug_mode",
    "max_batch",
    "autoguidance_scale",
    "scheduler",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny cascade with stage records, an input image, and a folder of the user's own files."""
    root = tmp_path_factory.mktemp("gen") / "cascade"
    make_cascade(root, sizes=(8, 32))
    for name in ("base64", "sr64to256"):
        (root / name / "cdm_stage.json").write_text(
            json.dumps({"stage": {"name": name}, "run": {"steps": 1}})
        )
    image = root.parent / "in.png"
    PIL.Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(image)
    return root, image


def run(main, argv: list[str]) -> tuple[int, str]:
    """A console entry point in this process: its exit code and stderr. Any exception escaping it (a
    traceback for the user) fails the test."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue()


def assert_refused(code: int, stderr: str, case: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, f"{case}: exit {code}, stderr {stderr[-500:]!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{case}: {stderr[-500:]!r}"
    assert "Traceback" not in stderr, case


def flag_cases(rng: random.Random, world, tmp: Path) -> list[tuple]:
    root, image = world
    base = {
        "generate": (generate_cli.main, ["--model", str(root), "--class", "1", "--out", str(tmp / "out")]),
        "upscale": (upscale_cli.main, [str(image), "--model", str(root), "--out", str(tmp / "out")]),
        "eval": (eval_cli.main, ["sr", "--model", str(root), "--data", "digits", "--out", str(tmp / "out")]),
    }
    cases = []
    for cli, flags in (("generate", GENERATE_FLAGS), ("upscale", UPSCALE_FLAGS), ("eval", EVAL_FLAGS)):
        main, argv = base[cli]
        for flag, values in flags.items():
            for value in values:
                cases.append((f"{cli} {flag}={value!r}", main, [*argv, flag, value]))
        for _ in range(10):  # two bad flags at once, in random order
            (f1, v1), (f2, v2) = [(f, rng.choice(flags[f])) for f in rng.sample(sorted(flags), 2)]
            cases.append((f"{cli} {f1}={v1!r} {f2}={v2!r}", main, [*argv, f1, v1, f2, v2]))
    return cases


def test_generated_bad_numbers_are_refused_by_every_sampling_cli(world, tmp_path, cache_env):
    rng = random.Random(SEED)
    cases = flag_cases(rng, world, tmp_path)
    assert len(cases) >= 150
    before = tree_hashes(world[0].parent)
    for case, main, argv in cases:
        code, stderr = run(main, argv)
        assert_refused(code, stderr, case)
        assert not (tmp_path / "out").exists(), f"{case}: wrote an output folder"
    assert tree_hashes(world[0].parent) == before


def corrupt(root: Path, rng: random.Random) -> str:
    """One random wrong value in one field of one JSON file of the cascade; returns what was done."""
    if rng.random() < 0.3:  # a sampling setting of cascade.json
        spec = json.loads((root / "cascade.json").read_text())
        k, key = rng.randrange(len(spec["stages"])), rng.choice(SAMPLING)
        value = rng.choice([v for v in WRONG_VALUES if v is not None] + ["Infinity", "nope"])
        spec["stages"][k]["sampling"][key] = value
        (root / "cascade.json").write_text(json.dumps(spec))
        return f"cascade.json stages[{k}].sampling.{key}={value!r}"
    name = rng.choice(sorted(FIELDS))
    path = root / name
    if rng.random() < 0.15:  # the whole file of another shape
        text = rng.choice(["[]", "5", '"x"', "{", "null", "[1, 2]", "NaN", '{"a": 1e400}'])
        path.write_text(text)
        return f"{name} = {text}"
    data = json.loads(path.read_text())
    key, value = rng.choice(FIELDS[name]), rng.choice(WRONG_VALUES)
    data[key] = value
    path.write_text(json.dumps(data))
    return f"{name}: {key}={value!r}"


def still_valid(root: Path, what: str) -> bool:
    """A few random edits happen to be valid input (e.g. `label_set: "x"` is ignored); those are skipped."""
    return what.startswith("cascade.json: label_set") or what.endswith("cdm_stage.json: run={}")


def test_generated_wrong_folder_json_is_refused_before_any_work(world, tmp_path, cache_env):
    rng = random.Random(SEED + 1)
    src, image = world
    checked = 0
    for k in range(200):
        root = tmp_path / f"c{k}"
        shutil.copytree(src, root)
        what = corrupt(root, rng)
        if still_valid(root, what):
            continue
        before = tree_hashes(root)
        main, argv = rng.choice(
            [
                (generate_cli.main, ["--model", str(root), "--class", "1", "--out", str(tmp_path / "out")]),
                (upscale_cli.main, [str(image), "--model", str(root), "--out", str(tmp_path / "out")]),
            ]
        )
        code, stderr = run(main, argv)
        if code == 0:  # an edit that changed nothing the command reads: it must then have worked normally
            shutil.rmtree(tmp_path / "out")
            assert what.split(":")[0].endswith(("cdm_stage.json", "label_set")) or "=" in what, what
            continue
        assert_refused(code, stderr, what)
        assert tree_hashes(root) == before, what
        assert not (tmp_path / "out").exists(), f"{what}: wrote an output folder"
        checked += 1
        shutil.rmtree(root)
    assert checked >= 150


def test_generated_user_files_in_the_output_folder_are_never_replaced(world, tmp_path, cache_env):
    """Random files of the user's, some with exactly the names a run would write, some cdm's own lock:
    with or without --overwrite, a run that would replace one stops, and every file stays."""
    rng = random.Random(SEED + 2)
    root, image = world
    for k in range(60):
        out = tmp_path / f"out{k}"
        out.mkdir()
        names = ["grid.png", "in-x4.png", "results.json", "results.md", "000-one-seed0-32px.png", "notes.txt"]
        for name in rng.sample(names, rng.randint(1, 3)):
            (out / name).write_bytes(os.urandom(rng.randint(0, 64)))
        if rng.random() < 0.2:  # another cdm process (here: the test's parent, alive) holds the folder
            (out / ".cdm-lock").write_text(str(os.getppid()))
        before = tree_hashes(out)
        main, argv = rng.choice(
            [
                (generate_cli.main, ["--model", str(root), "--class", "1", "--out", str(out)]),
                (upscale_cli.main, [str(image), "--model", str(root), "--out", str(out)]),
            ]
        )
        argv += ["--overwrite"] if rng.random() < 0.5 else []
        written = ("grid.png", "000-one-seed0-32px.png") if main is generate_cli.main else ("in-x4.png",)
        collides = any((out / n).exists() for n in written)
        locked = (out / ".cdm-lock").exists()
        code, stderr = run(main, argv)
        if collides or locked:
            assert_refused(code, stderr, f"{sorted(before)} {argv[-1]}")
            assert tree_hashes(out) == before
        else:  # nothing of the user's is in the way: the run works, and leaves the user's files alone
            assert code == 0, stderr
            after = tree_hashes(out)
            assert {k: v for k, v in after.items() if k in before} == before


def test_the_reported_ways_around_the_checks_are_closed(world, tmp_path, cache_env):
    """Each case once found by hand: exit 2, one line, and nothing of the user's changed."""
    import stat

    from cdm.cli import export as export_cli

    root, image = world
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mine.py").write_text("print('mine')\n")
    # a run whose record names an absolute stage folder: export must not write or delete there
    run_dir = tmp_path / "run"
    shutil.copytree(root / "base64", run_dir / "export")
    (run_dir / "export" / "cdm_stage.json").write_text(json.dumps({"stage": {"name": str(victim)}}))
    (run_dir / "config.json").write_text("{}")
    # a stage folder with a link to a file outside it
    linked = tmp_path / "linked"
    shutil.copytree(root / "sr64to256", linked)
    (linked / "scheduler" / "extra.json").symlink_to(victim / "mine.py")
    # an upscale whose output would be one of its inputs
    (tmp_path / "photos").mkdir()
    for name in ("a.png", "a-x4.png"):
        shutil.copyfile(image, tmp_path / "photos" / name)
    # a results.md, a .partial/ and a .<out>-old/ of the user's
    (tmp_path / "evalout").mkdir()
    (tmp_path / "evalout" / "results.md").write_text("my notes\n")
    (tmp_path / "genout" / ".partial").mkdir(parents=True)
    (tmp_path / "genout" / ".partial" / "keep.txt").write_text("mine\n")
    (tmp_path / ".published-old").mkdir()
    (tmp_path / ".published-old" / "keep.txt").write_text("mine\n")
    # NaN weights
    nan = tmp_path / "nan"
    shutil.copytree(root, nan)
    from safetensors.torch import load_file, save_file

    weights = nan / "base64" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = tensors[first] * float("nan")
    save_file(tensors, weights)
    cases = [
        (export_cli.main, [str(run_dir), "--out", str(tmp_path / "e1")], "stage name"),
        (export_cli.main, [str(linked), "--out", str(tmp_path / "e2")], "is a link"),
        (
            upscale_cli.main,
            [
                *(str(tmp_path / "photos" / n) for n in ("a.png", "a-x4.png")),
                "--out",
                str(tmp_path / "photos"),
                "--overwrite",
            ],
            "is one of the inputs",
        ),
        (
            eval_cli.main,
            ["sr", "--model", str(root), "--data", "digits", "--out", str(tmp_path / "evalout")],
            "results.md already exists",
        ),
        (
            eval_cli.main,
            [
                "sr",
                "--model",
                str(root),
                "--data",
                "digits",
                "--out",
                str(tmp_path / "evalout"),
                "--overwrite",
            ],
            "results.md exists and was not written by cdm",
        ),
        (
            eval_cli.main,
            [
                "gen",
                "--model",
                str(root),
                "--data",
                "digits",
                "--num-per-class",
                "1",
                "--out",
                str(tmp_path / "genout"),
            ],
            ".partial exists and was not written by cdm-eval",
        ),
        (
            export_cli.main,
            [
                str(root / "base64"),
                str(root / "sr64to256"),
                "--out",
                str(tmp_path / "e3"),
                "--set",
                "sr64to256.guidance_scale=inf",
            ],
            "guidance_scale=inf",
        ),
        (
            generate_cli.main,
            ["--model", str(root), "--class", "1", "--guidance", "nan", "--out", str(tmp_path / "g")],
            "guidance_scale=nan",
        ),
        (generate_cli.main, ["--model", str(nan), "--class", "1", "--out", str(tmp_path / "g")], "NaN"),
    ]
    before = tree_hashes(tmp_path)
    for main, argv, needle in cases:
        code, stderr = run(main, argv)
        assert_refused(code, stderr, " ".join(argv[:4]))
        assert needle in stderr, stderr
        assert tree_hashes(tmp_path) == before, argv
    # --overwrite of an export never removes a folder of the user's with the name of its old copy
    out = tmp_path / "published"
    for _ in range(2):
        assert run(export_cli.main, [str(root / "base64"), "--out", str(out), "--overwrite"])[0] == 0
    assert (tmp_path / ".published-old" / "keep.txt").read_text() == "mine\n"
    # outputs are readable by others as the umask says, not private temporary files
    old = os.umask(0o022)
    try:
        assert (
            run(generate_cli.main, ["--model", str(root), "--class", "1", "--out", str(tmp_path / "g")])[0]
            == 0
        )
    finally:
        os.umask(old)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in (tmp_path / "g").glob("*.png"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

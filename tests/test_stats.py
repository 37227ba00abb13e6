"""Reference statistics (.npz, no pickle), FID/KID from features, improved precision and recall."""

import json

import numpy as np
import pytest
import torch
from conftest import make_cascade, make_imagefolder, run_cli
from torch import nn

from cdm.errors import UserError
from cdm.measure.fid import (
    feature_distances,
    frechet_distance,
    kernel_distance,
    load_stats,
    precision_recall,
    save_stats,
)


class MeanColour(nn.Module):
    """A stand-in feature extractor: per-channel means and stds of uint8 images (6 features)."""

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def test_stats_round_trip_and_fid_from_stats_equals_fid_from_features(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(0.5, 1.2, size=(150, 8))
    save_stats(tmp_path / "b.npz", b)
    stats = load_stats(tmp_path / "b.npz")
    np.testing.assert_allclose(stats["mu"], b.mean(0))
    np.testing.assert_allclose(stats["pool"], b, rtol=1e-6)
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), stats["mu"], stats["sigma"])
    assert fid == pytest.approx(feature_distances(a, b)["fid"], rel=1e-9)
    # a pure shift of the mean adds its squared length and nothing else
    shifted = frechet_distance(np.zeros(3), np.eye(3), np.full(3, 2.0), np.eye(3))
    assert shifted == pytest.approx(12.0)


def test_fid_and_kid_match_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen)
    fake = (real.float() * 0.7 + 30).to(torch.uint8)
    feature = MeanColour()
    f_real, f_fake = feature(real).double().numpy(), feature(fake).double().numpy()
    fid = FrechetInceptionDistance(feature=feature)
    kid = KernelInceptionDistance(feature=feature, subsets=1, subset_size=40)  # one subset: all of both
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    ours = feature_distances(f_fake, f_real)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-4)
    assert kernel_distance(f_fake, f_real, subsets=1, subset_size=40) == pytest.approx(
        float(kid.compute()[0]), rel=1e-4
    )


def test_precision_and_recall():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(100, 4))
    same = precision_recall(real, real.copy())
    far = precision_recall(real, real + 100.0)
    assert same == {"precision": 1.0, "recall": 1.0}
    assert far == {"precision": 0.0, "recall": 0.0}
    # generated points covering only half the real manifold: precise, but half the recall
    half = real[real[:, 0] > 0]
    pr = precision_recall(real, half)
    assert pr["precision"] == 1.0 and 0.3 < pr["recall"] < 0.8


@pytest.mark.parametrize(
    "content, expected",
    [
        ("pickle", "not a plain .npz"),
        ("missing", "expected arrays 'mu' and 'sigma'"),
        ("shape", "expected (d,) and (d, d)"),
        ("not-npz", "not a plain .npz"),
    ],
)
def test_bad_reference_stats_are_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "ref.npz"
    if content == "pickle":  # an object array can only be stored as a pickle
        np.savez(path, mu=np.zeros(2), sigma=np.eye(2), extra=np.array([{"a": 1}], dtype=object))
    elif content == "missing":
        np.savez(path, mu=np.zeros(2))
    elif content == "shape":
        np.savez(path, mu=np.zeros(2), sigma=np.eye(3))
    else:
        path.write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_stats(path)


def test_guided_diffusion_reference_batch_with_images_gives_pool_features(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)  # NHWC, as arr_0
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(6), sigma=np.eye(6))
    stats = load_stats(tmp_path / "ref.npz", MeanColour())
    assert stats["pool"].shape == (6, 6) and "arr_0" not in stats


@pytest.mark.slow
def test_eval_gen_saves_stats_and_scores_against_them(tmp_path, cache_env):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    data = tmp_path / "imgs"
    make_imagefolder(data / "train", classes=3, per_class=4, size=16, seed=1)
    make_imagefolder(data / "test", classes=3, per_class=4, size=16, seed=2)
    common = ["cdm-eval", "gen", "--model", str(root), "--stages", "1", "--num-per-class", "2"]
    common += ["--data", "imagefolder", "--data-path", str(data)]
    res = run_cli(
        [*common, "--fid", "--save-stats", str(tmp_path / "s.npz"), "--out", str(tmp_path / "a")],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    first = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]
    assert {"fid", "kid", "precision", "recall"} <= set(first)
    # the same samples (same seeds) against their own statistics: FID 0, full precision and recall
    res = run_cli(
        [*common, "--reference-stats", str(tmp_path / "s.npz"), "--out", str(tmp_path / "b")],
        tmp_path,
        cache_env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]
    assert abs(again["fid"]) < 1e-3 and again["precision"] == 1.0 and again["recall"] == 1.0
    # an existing stats file is not replaced without --overwrite, before any sampling
    res = run_cli(
        [*common, "--save-stats", str(tmp_path / "s.npz"), "--out", str(tmp_path / "c2")], tmp_path, cache_env
    )
    assert (
        res.returncode == 2 and "already exists" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    )


def test_cached_features_compute_a_batch_once_and_return_the_same_features():
    from torch import nn

    from cdm.measure.fid import CachedFeatures

    class Counting(nn.Module):
        calls = 0
        num_features = 3

        def forward(self, x):
            Counting.calls += 1
            return x.float().flatten(1)[:, :3] * 2

    cached = CachedFeatures(Counting())
    a = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 0, 0, 0] ^= 1  # one value differs: another batch
    first = cached(a)
    torch.testing.assert_close(cached(a.clone()), first)
    assert Counting.calls == 1
    torch.testing.assert_close(cached(b), Counting()(b))
    assert Counting.calls == 3  # b computed once by the cache, once directly here

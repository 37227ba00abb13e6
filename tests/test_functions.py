"""Pure functions: degradations, levels, label dropout, rendering, loss, checkpoint format."""

import pytest
import torch
from diffusers import DDPMScheduler

from cdm.train.checkpoint import optimizer_from_flat, optimizer_to_flat
from cdm.train.data import IndexStream
from cdm.train.degradations import (
    downsample,
    drop_labels,
    gaussian_blur,
    random_blur,
    render_crisp,
    sample_levels,
)
from cdm.train.losses import DiffusionLoss


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_downsample_keeps_constants_and_averages_stripes():
    x = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(downsample(x, 4), torch.full((1, 3, 4, 4), 0.3), atol=1e-6)
    stripes = torch.zeros(1, 1, 16, 16)
    stripes[..., ::2] = 1.0
    # anti-aliasing: a stripe pattern above the new Nyquist rate averages to grey, not aliasing
    assert (downsample(stripes, 4) - 0.5).abs().max() < 0.05


def test_gaussian_blur_preserves_constants_and_smooths_per_sample():
    x = torch.full((2, 3, 12, 12), -0.2)
    assert torch.allclose(gaussian_blur(x, torch.tensor([0.5, 2.0])), x, atol=1e-6)
    impulse = torch.zeros(2, 1, 15, 15)
    impulse[:, :, 7, 7] = 1
    out = gaussian_blur(impulse, torch.tensor([0.5, 2.0]))
    assert out[0, 0, 7, 7] > out[1, 0, 7, 7]  # wider sigma spreads the mass further
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(2, 1), atol=1e-4)


def test_random_blur_probability_zero_and_one():
    x = torch.rand(8, 3, 10, 10)
    assert torch.equal(random_blur(x, 0.0, [0.4, 0.6], g()), x)
    out = random_blur(x, 1.0, [0.4, 0.6], g())
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0


def test_sample_levels_covers_the_range():
    s = sample_levels(5000, 250, g())
    assert s.min() == 0 and s.max() == 250
    assert s.float().mean().item() == pytest.approx(125, abs=5)


def test_drop_labels_rate_and_null_id():
    labels = torch.zeros(10000, dtype=torch.long)
    out = drop_labels(labels, 0.1, 10, g())
    assert set(out.unique().tolist()) == {0, 10}
    assert (out == 10).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_render_crisp_has_sharp_edges_at_any_size():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6] = 1.0
    for size in (64, 256):
        row = render_crisp(x, size)[0, 0, size // 2]
        mid = ((row > 0.1) & (row < 0.9)).sum().item()
        assert mid <= 6  # a transition a few pixels wide, whatever the scale
        assert row.max() > 0.95 and row.min() < 0.05


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_zero_for_the_exact_target(prediction_type):
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    captured = {}

    def oracle(x_t, t):  # recover the target from x_t and x0: the loss must then be ~0
        ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        captured["t"] = t
        return eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

    loss = DiffusionLoss(sched, prediction_type)(oracle, x0, g(1))
    assert loss.item() < 1e-8
    assert DiffusionLoss(sched, prediction_type)(lambda x_t, t: torch.zeros_like(x_t), x0, g(1)).item() > 0.1


def test_estimate_fraction_trains_the_zero_step_estimate_that_the_pipeline_returns():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    x0 = torch.randn(64, 3, 4, 4, generator=g(0))
    seen = {}

    def capture(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    off, draws = g(1), g(1)
    DiffusionLoss(sched, "v_prediction", estimate_fraction=0.0)(capture, x0, off)
    torch.randint(0, 1000, (64,), generator=draws), torch.randn(x0.shape, generator=draws)  # t and eps
    assert torch.equal(off.get_state(), draws.get_state())  # off: no extra draw, existing runs unchanged
    loss = DiffusionLoss(sched, "v_prediction", estimate_fraction=0.5)
    x_t, t, target = loss.with_estimates(x0, torch.ones_like(x0), torch.zeros(64, dtype=torch.long), x0, g(2))
    picked = t == 999
    assert 16 < picked.sum() < 48  # about half
    assert (x_t[picked] == 0).all() and (x_t[~picked] == 1).all() and (target[~picked] == x0[~picked]).all()
    ab = sched.alphas_cumprod[999]
    clean = ab.sqrt() * x_t[picked] - (1 - ab).sqrt() * target[picked]  # the pipeline's v -> x0
    torch.testing.assert_close(clean, x0[picked], atol=1e-5, rtol=0)
    everything = DiffusionLoss(sched, "v_prediction", estimate_fraction=1.0)
    everything(capture, x0, g(1))
    assert (seen["t"] == 999).all() and (seen["x_t"] == 0).all()
    with pytest.raises(ValueError, match="expected v_prediction"):
        DiffusionLoss(sched, "epsilon", estimate_fraction=0.5)(capture, x0, g(1))


def test_timestep_power_moves_training_to_low_noise_and_one_is_the_uniform_draw():
    sched = DDPMScheduler(num_train_timesteps=1000)
    uniform = DiffusionLoss(sched, timestep_power=1.0).timesteps(4000, g(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (4000,), generator=g(3)))  # existing runs unchanged
    low = DiffusionLoss(sched, timestep_power=3.0).timesteps(4000, g(3))
    assert low.dtype == torch.long and low.min() >= 0 and low.max() <= 999
    # P(t < 90) is 0.09 for the uniform draw and 0.09 ** (1/3) = 0.45 for p = 3
    assert abs((uniform < 90).float().mean() - 0.09) < 0.02
    assert abs((low < 90).float().mean() - 0.45) < 0.03


def test_optimizer_state_roundtrips_through_flat_form():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_to_flat(opt.state_dict())
    restored = optimizer_from_flat(tensors, meta)
    original = opt.state_dict()
    for pid, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(restored["state"][pid][key]), torch.as_tensor(value))
    assert restored["param_groups"] == original["param_groups"]


def test_index_stream_is_a_pure_function_of_the_step():
    a = IndexStream(10, 3, seed=1, start=0)
    b = IndexStream(10, 3, seed=1, start=5)
    assert list(zip(range(7), a)) == list(enumerate(a.batch(i) for i in range(7)))
    assert next(iter(b)) == a.batch(5)
    assert a.batch(0) != a.batch(1) and len(a.batch(0)) == 3  # the stream moves on, one batch per step
    # ranks read disjoint slices of the same global batch
    r0, r1 = IndexStream(10, 2, 1, rank=0, world=2), IndexStream(10, 2, 1, rank=1, world=2)
    assert set(r0.batch(0)).isdisjoint(r1.batch(0))
    # every epoch is a permutation
    epoch0 = [idx for step in range(5) for (e, idx) in IndexStream(10, 2, 3).batch(step)]
    assert sorted(epoch0) == list(range(10))


def _streamed(tmp_path, num_shards=None, **kw):
    import datasets
    from conftest import make_imagefolder

    from cdm.config import DataConfig, DataSource, StageConfig
    from cdm.train.data import StreamingStageDataset, open_dataset

    root = make_imagefolder(tmp_path / "imgs", classes=2, per_class=5, size=24)
    data = DataConfig(source=DataSource.imagefolder, path=str(root), streaming=True)
    ds, label_col, id2label = open_dataset(data)
    assert isinstance(ds, datasets.IterableDataset) and id2label == {0: "class0", 1: "class1"}
    if num_shards:  # the same records, in several shards (as large Hub datasets come)
        data.streaming = False
        ds = open_dataset(data)[0].to_iterable_dataset(num_shards=num_shards)
    stage = StageConfig(name="base64", resolution=16)
    return lambda **more: StreamingStageDataset(
        ds, data, label_col, (stage.resolution, stage.crop_size), seed=3, **{**kw, **more}
    )


def _take(dataset, n):
    out = []
    for example in dataset:
        out.append(example["image"] if isinstance(example, dict) else example)
        if len(out) == n:
            return out
    raise AssertionError(f"the stream ended after {len(out)} examples")


def test_streamed_data_resumes_where_it_stopped_and_splits_ranks(tmp_path, cache_env):
    make = _streamed(tmp_path, batch_size=2)
    straight = _take(make(), 24)  # 10 records: more than two epochs
    resumed = _take(make(start=3), 18)  # three batches of two were consumed
    assert all(torch.equal(a, b) for a, b in zip(straight[6:], resumed))
    # a new epoch reshuffles and draws new crops, yet covers the same records
    first, second = straight[:10], straight[10:20]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    # two ranks read disjoint halves of each epoch
    rank0, rank1 = _take(make(world=2, rank=0), 5), _take(make(world=2, rank=1), 5)
    sums = sorted(round(float(x.sum()), 3) for x in rank0 + rank1)
    assert sums == sorted(round(float(x.sum()), 3) for x in first)


@pytest.mark.parametrize("num_shards", [None, 4], ids=["one-shard", "four-shards"])
def test_streamed_data_with_workers_skips_what_each_worker_read(tmp_path, cache_env, num_shards):
    make = _streamed(tmp_path, num_shards, batch_size=1)

    def loader(start):
        return torch.utils.data.DataLoader(
            make(start=start), batch_size=1, num_workers=2, collate_fn=lambda b: b[0]
        )

    straight = _take(loader(0), 8)
    resumed = _take(loader(4), 4)
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed))

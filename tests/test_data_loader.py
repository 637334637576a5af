"""InMemoryLoader: normalization against the reference formula, seeded epochs, batching options, dtypes."""

from __future__ import annotations

import pytest
import torch

from vitbn.data import InMemoryLoader, Split

N, MEAN, STD = 103, (0.2, 0.5, 0.7), (0.3, 0.25, 0.1)


@pytest.fixture
def split() -> Split:
    """Random RGB 4x5 images whose label is their index, so a batch's labels say which images it holds."""
    images = torch.randint(0, 256, (N, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split(images, torch.arange(N))


def reference(split: Split, index: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    return (split.images[index].double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def order(loader: InMemoryLoader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_equal_reference_normalization(split, shuffle):
    loader = InMemoryLoader(split, batch_size=16, mean=MEAN, std=STD, shuffle=shuffle, seed=3)
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 4, 5)
        torch.testing.assert_close(x, reference(split, y).float())


def test_one_epoch_covers_each_index_once(split):
    loader = InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD, shuffle=True, seed=1)
    seen = order(loader)
    assert sorted(seen) == list(range(N)) and seen != list(range(N))
    assert len(loader) == 11 and loader.num_samples == N
    assert order(InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD)) == list(range(N))  # no shuffle: in order


def test_set_epoch_reproduces_the_order(split):
    first = InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD, shuffle=True, seed=7)
    orders = {}
    for epoch in range(3):
        first.set_epoch(epoch)
        orders[epoch] = order(first)
    assert len({tuple(o) for o in orders.values()}) == 3  # different epochs differ
    resumed = InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD, shuffle=True, seed=7)
    resumed.set_epoch(2)  # a fresh loader (a resumed run) gets epoch 2's order directly
    assert order(resumed) == orders[2]
    assert order(resumed) == orders[2]  # iterating again without set_epoch repeats the epoch
    other_seed = InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD, shuffle=True, seed=8)
    other_seed.set_epoch(2)
    assert order(other_seed) != orders[2]


def test_drop_last_and_max_batches(split):
    sizes = [len(y) for _, y in InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD)]
    assert sizes == [10] * 10 + [3]
    loader = InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD, shuffle=True, drop_last=True)
    batches = [y for _, y in loader]
    assert [len(y) for y in batches] == [10] * 10 and len(loader) == 10 and loader.num_samples == 100
    assert len(set(torch.cat(batches).tolist())) == 100
    capped = InMemoryLoader(split, batch_size=10, mean=MEAN, std=STD, max_batches=4)
    assert [len(y) for _, y in capped] == [10] * 4 and len(capped) == 4 and capped.num_samples == 40
    loose = InMemoryLoader(split, batch_size=50, mean=MEAN, std=STD, max_batches=9)
    assert [len(y) for _, y in loose] == [50, 50, 3] and len(loose) == 3 and loose.num_samples == N
    both = InMemoryLoader(split, batch_size=50, mean=MEAN, std=STD, max_batches=9, drop_last=True)
    assert len(both) == 2 and both.num_samples == 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(split, dtype):
    loader = InMemoryLoader(split, batch_size=32, mean=MEAN, std=STD, shuffle=True, dtype=dtype)
    for x, y in loader:
        assert x.dtype == dtype
        torch.testing.assert_close(x, reference(split, y).to(dtype))  # one rounding: default tolerances of dtype


def test_scalar_mean_std_broadcast_to_channels(split):
    x, y = next(iter(InMemoryLoader(split, batch_size=8, mean=0.5, std=[0.25])))
    torch.testing.assert_close(x, ((split.images[y].float() / 255 - 0.5) / 0.25))


def test_empty_split():
    loader = InMemoryLoader(
        Split(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)),
        batch_size=4,
        mean=0.5,
        std=0.5,
        shuffle=True,
    )
    assert list(loader) == [] and len(loader) == 0 and loader.num_samples == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(batch_size=0), r"batch_size=0 must be a positive integer"),
        (dict(max_batches=0), r"max_batches=0 must be a positive integer or None"),
        (dict(mean=(0.1, 0.2)), r"mean has 2 values; the images have 3 channel\(s\)"),
        (dict(std=(0.1, 0.0, 0.2)), r"std=\[0\.1, 0\.0, 0\.2\] must be > 0 in every channel"),
        (dict(dtype=torch.int32), r"dtype=torch.int32 is not one of torch.float32"),
        (dict(seed=-1), r"seed=-1 must be >= 0"),
    ],
)
def test_bad_arguments(split, kwargs, match):
    args = dict(batch_size=4, mean=MEAN, std=STD) | kwargs
    with pytest.raises(ValueError, match=match):
        InMemoryLoader(split, **args)
    with pytest.raises(ValueError, match=r"epoch=-1 must be >= 0"):
        InMemoryLoader(split, batch_size=4, mean=MEAN, std=STD).set_epoch(-1)

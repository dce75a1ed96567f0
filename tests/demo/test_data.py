"""The drift augmentation of the demo data (freeflow.demo.data.augment and its warp).

Independent references: ``torch.rot90`` for a 90° rotation, slicing for an integer shift, all-background
images for counting inversions (geometry leaves them at -1, inversion turns them to +1).
"""
import math

import pytest
import torch

from freeflow.demo.data import augment, warp


def _images(n=8, h=8, w=8, seed=0, dtype=torch.float32):
    """Digit-like images in [-1, 1]: background -1 and a bright random blob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, h, w), -1.0, dtype=dtype)
    x[:, :, 2:-2, 2:-2] = (torch.rand(n, 1, h - 4, w - 4, generator=g) * 2 - 1).to(dtype)
    return x


def test_strength_zero_returns_the_input_and_draws_nothing():
    x = _images()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert augment(x, 0.0, g) is x
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_shape_dtype_and_range_are_kept(dtype, strength):
    x = _images(n=16, h=12, w=10, dtype=dtype)
    out = augment(x, strength, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)


def test_inversion_happens_to_about_half_at_full_strength():
    n = 2000
    blank = torch.full((n, 1, 8, 8), -1.0)
    out = augment(blank, 1.0, torch.Generator().manual_seed(2))
    # geometry maps background to background: every image is all -1 or, inverted, all +1
    flat = out.flatten(1)
    assert torch.all((flat == -1).all(1) | (flat == 1).all(1))
    inverted = (flat[:, 0] == 1).sum().item()
    assert abs(inverted - n / 2) < 4 * math.sqrt(n / 4)
    quarter = (augment(blank, 0.5, torch.Generator().manual_seed(2)).flatten(1)[:, 0] == 1).sum().item()
    assert abs(quarter - n / 4) < 4 * math.sqrt(n * 0.25 * 0.75)  # probability 0.5·strength


def test_deterministic_for_a_seeded_generator():
    x = _images(n=6)
    a = augment(x, 0.7, torch.Generator().manual_seed(3))
    torch.manual_seed(99)  # the global RNG plays no part
    b = augment(x, 0.7, torch.Generator().manual_seed(3))
    c = augment(x, 0.7, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_drift_grows_with_strength():
    x = _images(n=64, h=16, w=16, seed=5)
    drift = [(augment(x, s, torch.Generator().manual_seed(6)) - x).abs().mean().item() for s in (0.1, 0.4, 1.0)]
    assert 0 < drift[0] < drift[1] < drift[2]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_warp_by_90_degrees_is_rot90(dtype, tol):
    x = _images(n=3, h=9, w=9, dtype=dtype)
    x[:, :, 0, :3] = 0.5  # a mark in the top-left corner, so the direction shows
    ccw = warp(x, torch.full((3,), 90.0, dtype=dtype))
    cw = warp(x, torch.full((3,), -90.0, dtype=dtype))
    assert (ccw - torch.rot90(x, 1, (-2, -1))).abs().max() <= tol
    assert (cw - torch.rot90(x, -1, (-2, -1))).abs().max() <= tol
    assert (warp(x, torch.zeros(3, dtype=dtype)) - x).abs().max() <= tol


def test_warp_integer_displacement_is_a_shift_with_background():
    x = _images(n=2, h=8, w=6, seed=7, dtype=torch.float64)
    x[:, :, :, 0] = 0.25  # non-background at the edge that moves out of view
    d = torch.zeros(2, 2, 8, 6, dtype=torch.float64)
    d[:, 0] = 1.0  # read one column to the right: content moves left
    d[:, 1] = -2.0  # read two rows up: content moves down
    out = warp(x, displacement=d)
    want = torch.full_like(x, -1.0)
    want[:, :, 2:, :-1] = x[:, :, :-2, 1:]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strength", [1.5, -0.1, float("nan"), True])
def test_strength_out_of_range_raises(strength):
    with pytest.raises(ValueError, match="strength must be a float in"):
        augment(_images(), strength, torch.Generator().manual_seed(0))

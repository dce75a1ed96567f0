"""Fréchet distance against closed forms and an independent float64 formula; feature statistics against
numpy; the shipped feature network and reference statistics."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from freeflow.demo import features
from freeflow.frechet import frechet_distance


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spin-waiting makes 2 threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spd(d, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def _reference_fd(mu1, s1, mu2, s2):
    """Textbook form tr (Σ₁Σ₂)^½ via the eigenvalues of the non-symmetric product (real and ≥ 0 up to
    round-off, since Σ₁Σ₂ is similar to Σ₁^½Σ₂Σ₁^½) — a different computation from the one under test."""
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# -- frechet_distance -----------------------------------------------------------------------------

def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_of_singular_covariances_has_no_round_off_square_roots():
    # Σ₂ = 4·Σ₁ with Σ₁ of rank 3 in 16-d: FD = tr Σ₁·(1 - √4)² = tr Σ₁ exactly. The 13 null directions leave
    # round-off eigenvalues ~1e-16 whose square roots (~1e-8) must not reach the result.
    s = _spd(16, 3, seed=3)
    mu = np.zeros(16)
    assert frechet_distance(mu, s, mu, 4 * s) == pytest.approx(np.trace(s), rel=1e-12)
    assert frechet_distance(mu, 4 * s, mu, s) == pytest.approx(np.trace(s), rel=1e-12)


@pytest.mark.parametrize("rank", [None, 3])
def test_fd_matches_independent_formula(rank):
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = _spd(16, rank, seed=3), _spd(16, seed=4)
    got = frechet_distance(mu1, s1, mu2, s2)
    # A singular Σ₁ leaves round-off eigenvalues ~1e-16 whose square roots (~1e-8) the reference keeps.
    assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9 if rank is None else 1e-6)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric


def test_fd_accepts_torch_and_is_zero_for_identical():
    s = _spd(8)
    mu = np.arange(8.0)
    assert frechet_distance(torch.tensor(mu), torch.tensor(s), mu, s) == pytest.approx(0, abs=1e-10)
    t = frechet_distance(torch.tensor(mu, dtype=torch.float32), torch.tensor(s, dtype=torch.float32),
                                 mu + 1, s)
    assert t == pytest.approx(8.0, rel=1e-5)  # equal covariances: only the squared mean shift remains


def test_fd_of_two_samples_of_one_gaussian_is_small():
    rng = np.random.default_rng(5)
    s, mu = _spd(8), rng.standard_normal(8)
    a = rng.multivariate_normal(mu, s, 20000)
    b = rng.multivariate_normal(mu, s, 20000)
    same = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    shifted = b + 0.5
    moved = frechet_distance(a.mean(0), np.cov(a, rowvar=False), shifted.mean(0),
                                     np.cov(shifted, rowvar=False))
    assert same < 0.01 * np.trace(s)
    assert moved == pytest.approx(8 * 0.25, abs=0.05)


@pytest.mark.parametrize("args,name", [
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(3)), "mu2"),
    ((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), "sigma1"),
    ((np.zeros(3), np.eye(3), np.zeros(3), np.zeros(3)), "sigma2"),
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
    ((np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
])
def test_fd_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        frechet_distance(*args)


# -- feature statistics -----------------------------------------------------------------------------

class _PixelFeatures(nn.Module):
    """Features = three fixed pixels, so the statistics have a numpy reference."""

    def features(self, x):
        return x.flatten(1)[:, [0, 300, 400]]


def test_feature_statistics_match_numpy_and_clamp():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(37, 1, 28, 28, generator=g) * 3 - 1.5  # some pixels outside [-1, 1]
    mu, sigma = features.feature_statistics(_PixelFeatures(), images, batch_size=10)
    pix = images.clamp(-1, 1).flatten(1)[:, [0, 300, 400]].double().numpy()
    np.testing.assert_allclose(mu, pix.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(pix.T, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("images,name", [(torch.zeros(4, 28, 28), "images"), (torch.zeros(1, 1, 28, 28), "images")])
def test_feature_statistics_rejects_bad_images(images, name):
    with pytest.raises(ValueError, match=name):
        features.feature_statistics(_PixelFeatures(), images)


def test_feature_statistics_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        features.feature_statistics(_PixelFeatures(), torch.zeros(4, 1, 28, 28), batch_size=0)


# -- shipped assets -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from freeflow.demo.data import load_digits

    images, labels = load_digits()
    idx = torch.arange(7, 5000, 50)  # 100 digits, 10 of each class (the set is sorted by label)
    return images[idx], labels[idx]


def test_shipped_stats_shapes():
    net = features.load_feature_net()
    mu, sigma = features.load_reference_stats()
    d = net.config["feature_dim"]
    assert mu.shape == (d,) and sigma.shape == (d, d)
    np.testing.assert_allclose(sigma, sigma.T, atol=1e-12)
    assert np.linalg.eigvalsh(sigma).min() > -1e-8


def test_shipped_feature_net_classifies_real_digits(digits):
    images, labels = digits
    net = features.load_feature_net()
    with torch.no_grad():
        pred = net(images).argmax(1)
    assert (pred == labels).float().mean().item() >= 0.95


def test_mnist_fd_separates_real_digits_from_noise(digits):
    images, _ = digits
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real, fake = features.mnist_fd(images), features.mnist_fd(noise)
    assert real < 0.1 * fake

"""FID, Inception Score and precision/recall against closed forms, constructed point sets and numpy references."""
import numpy as np
import pytest
import torch

from freeflow.evaluate import gaussian_stats, inception_score, precision_recall
from freeflow.frechet import frechet_distance


def test_fid_of_gaussian_features_matches_the_closed_form():
    # Diagonal covariances commute: FD = ‖μ1 - μ2‖² + Σ_i (s1_i - s2_i)².
    rng = np.random.default_rng(0)
    d, n = 6, 200_000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    f1 = mu1 + s1 * rng.standard_normal((n, d))
    f2 = mu2 + s2 * rng.standard_normal((n, d))
    fid = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert fid == pytest.approx(closed, rel=0.02)
    assert frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(closed, rel=1e-10)


def test_gaussian_stats_are_the_unbiased_moments():
    f = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, sigma = gaussian_stats(f)
    np.testing.assert_allclose(mu, [3.0, 2.0])
    # Σ = Σ_i (f_i - μ)(f_i - μ)ᵀ / (n - 1), by hand: deviations (-2, 0), (0, -2), (2, 2)
    np.testing.assert_allclose(sigma, [[4.0, 2.0], [2.0, 4.0]])


def test_inception_score_closed_forms():
    # Confident and balanced over 10 classes in every split: IS = 10. Uniform predictions: IS = 1.
    logits = torch.full((100, 10), -60.0)
    logits[torch.arange(100), torch.arange(100) % 10] = 60.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert inception_score(torch.zeros(50, 7), splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    # all samples of one class, confident: p(y|x) = p(y), IS = 1
    one = torch.full((40, 5), -60.0)
    one[:, 2] = 60.0
    assert inception_score(one, splits=4)[0] == pytest.approx(1.0, abs=1e-6)


def _numpy_is(logits, splits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits: (i + 1) * n // splits]
        q = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(q)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_a_numpy_reference():
    logits = np.random.default_rng(1).normal(scale=3.0, size=(97, 13))
    mean, std = inception_score(torch.from_numpy(logits), splits=10)
    want = _numpy_is(logits, 10)
    assert mean == pytest.approx(want[0], rel=1e-9) and std == pytest.approx(want[1], rel=1e-7)


def test_precision_recall_on_a_constructed_point_set():
    # Reference: 0, 1, ..., 9 on a line. k = 3 radii: 3 at the ends, 2 inside.
    # Samples: 0.5 and 4.0-4.6 lie inside reference balls, 50-53 do not → precision 5/9.
    # Sample radii (k = 3): 0.5 → 3.9, 4.0 → 0.6, 4.2 → 0.4, 4.4 → 0.4, 4.6 → 0.6, 50 → 3, 51 → 2, 52 → 2, 53 → 3;
    # the reference points 0-4 lie in 0.5's ball and 5 in 4.6's; 6-9 in none → recall 6/10.
    ref = torch.tensor([[float(i), 0.0] for i in range(10)])
    gen = torch.tensor([[x, 0.0] for x in (0.5, 4.0, 4.2, 4.4, 4.6, 50.0, 51.0, 52.0, 53.0)])
    p, r = precision_recall(gen, ref, k=3, chunk=4)  # chunks smaller than the sets: the batched path
    assert p == pytest.approx(5 / 9) and r == pytest.approx(6 / 10)


def _numpy_pr(gen, ref, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    d = np.sqrt(((gen[:, None] - ref[None]) ** 2).sum(-1))
    precision = (d <= radii(ref)[None]).any(1).mean()
    recall = (d.T <= radii(gen)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_match_a_numpy_reference():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(120, 5))
    gen = rng.normal(loc=0.7, scale=0.8, size=(90, 5))
    p, r = precision_recall(torch.from_numpy(gen), torch.from_numpy(ref), k=3, chunk=32)
    want = _numpy_pr(gen, ref, 3)
    assert (p, r) == pytest.approx(want, abs=1e-12)
    assert 0.1 < p < 1.0 and 0.1 < r < 1.0  # the sets overlap partly: neither metric is trivial here


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3)

"""python -m freeflow.evaluate end to end with a random-weight Inception loaded from a file, as users load theirs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from freeflow.evaluate import inception_class, main, open_images
from freeflow.frechet import frechet_distance


def _images(seed, n=4, shift=0):
    """Smooth random images (a few blobs), uint8 (n, 16, 16, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    out = np.zeros((n, 16, 16, 3))
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(0, 16, 2)
            out[i] += rng.uniform(60, 120, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12)[..., None]
    return np.clip(out + shift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    a, b = _images(0), _images(1, shift=40)
    np.savez(d / "a.npz", arr_0=a)
    np.savez(d / "b.npz", arr_0=b)
    (d / "b_png").mkdir()
    for i, img in enumerate(b):
        Image.fromarray(img).save(d / "b_png" / f"{i:03d}.png")
    return d, a, b


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert main([*args, "--json", str(out), "--batch-size", "4", "--is-splits", "2"]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_a_set_against_itself(sets, inception_weights, tmp_path):
    d, _, _ = sets
    r = _run([str(d / "a.npz"), "--ref", str(d / "a.npz"), "--inception-weights", inception_weights], tmp_path, "aa")
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["num_samples"] == 4 and r["inception_score"] >= 1.0


@pytest.mark.slow
def test_fid_is_and_pr_against_an_independent_computation(sets, inception_weights, tmp_path):
    d, a, b = sets
    r = _run([str(d / "a.npz"), "--ref", str(d / "b_png"), "--inception-weights", inception_weights], tmp_path, "ab")
    # Independently: torch-fidelity's extractor on all images at once, numpy moments, numpy IS.
    net = inception_class()("x", ["2048", "logits_unbiased"], feature_extractor_weights_path=inception_weights).eval()
    with torch.no_grad():
        fa, la = (t.double().numpy() for t in net(torch.from_numpy(a).permute(0, 3, 1, 2)))
        fb, _ = (t.double().numpy() for t in net(torch.from_numpy(b).permute(0, 3, 1, 2)))
    fid = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert fid > 1e-4 and r["fid"] == pytest.approx(fid, rel=1e-3)
    p = np.exp(la - la.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    halves = [p[:2], p[2:]]
    scores = [np.exp(np.mean(np.sum(h * (np.log(h) - np.log(h.mean(0))), axis=1))) for h in halves]
    assert r["inception_score"] == pytest.approx(np.mean(scores), rel=1e-4)
    # stats in the reference file take the place of its images for FID (ADM's reference batches)
    np.savez(tmp_path / "stats.npz", mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    s = _run([str(d / "a.npz"), "--ref", str(tmp_path / "stats.npz"), "--inception-weights", inception_weights,
              "--no-pr"], tmp_path, "stats")
    assert s["fid"] == pytest.approx(fid, rel=1e-3) and s["precision"] is None


def test_folder_and_npz_read_the_same_rows_in_batches(sets):
    d, _, b = sets
    npz, folder = open_images(str(d / "b.npz"), "--ref"), open_images(str(d / "b_png"), "--ref")
    assert npz.n == folder.n == len(b)
    for src in (npz, folder):
        got = np.concatenate(list(src.batches(1, 4, 2)))  # rows 1..3 in batches of 2
        np.testing.assert_array_equal(got, b[1:4])


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_result(sets, inception_weights, tmp_path):
    d, _, _ = sets
    args = [str(d / "a.npz"), "--ref", str(d / "b.npz"), "--inception-weights", inception_weights, "--batch-size", "2",
            "--is-splits", "2"]
    one = _run(args[:-4], tmp_path, "one")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                           "-m", "freeflow.evaluate", *args, "--json", str(tmp_path / "two.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and "FID" in proc.stdout
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_bad_inputs_name_the_argument(sets, inception_weights, tmp_path, capsys):
    d, a, _ = sets
    np.savez(tmp_path / "float.npz", arr_0=a.astype(np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=a.transpose(0, 3, 1, 2).copy())
    np.savez(tmp_path / "other.npz", images=a)
    np.savez(tmp_path / "badstats.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "empty").mkdir()
    good = str(d / "a.npz")
    cases = [
        ([good, "--ref", good, "--inception-weights", str(tmp_path / "missing.pth")], "--inception-weights"),
        ([good, "--ref", good], "--inception-weights is required"),
        ([good, "--ref", good, "--inception-weights", good], "is not torch-fidelity's Inception-v3"),
        ([str(tmp_path / "float.npz"), "--ref", good, "--inception-weights", inception_weights],
         "SAMPLES .*arr_0 must be uint8 images \\(N, H, W, 3\\).*float32"),
        ([str(tmp_path / "nchw.npz"), "--ref", good, "--inception-weights", inception_weights],
         "SAMPLES .*\\(4, 3, 16, 16\\)"),
        ([good, "--ref", str(tmp_path / "other.npz"), "--inception-weights", inception_weights],
         "--ref .*holds neither arr_0"),
        ([good, "--ref", str(tmp_path / "badstats.npz"), "--inception-weights", inception_weights],
         "--ref .*mu must be \\(2048,\\)"),
        ([good, "--ref", str(tmp_path / "empty"), "--inception-weights", inception_weights], "--ref .*holds no images"),
        ([str(tmp_path / "nope.npz"), "--ref", good, "--inception-weights", inception_weights],
         "SAMPLES .*does not exist"),
    ]
    env = os.environ.pop("FREEFLOW_INCEPTION_WEIGHTS", None)
    try:
        for argv, pattern in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert __import__("re").search(pattern, err), (pattern, err)
    finally:
        if env is not None:
            os.environ["FREEFLOW_INCEPTION_WEIGHTS"] = env

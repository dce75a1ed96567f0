"""``python -m freeflow.evaluate``: FID, Inception Score and precision/recall of image samples, from local weights.

    python -m freeflow.evaluate SAMPLES --ref REF --inception-weights pt_inception-2015-12-05-6726825d.pth

SAMPLES and REF are ADM-style ``.npz`` files (``arr_0``: uint8 ``[N, H, W, 3]``, as ``python -m freeflow.sample
--npz`` writes) or folders of images (png/jpg/jpeg/bmp/webp, read in sorted order). A reference ``.npz`` may hold
precomputed ``mu``/``sigma`` (ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds both): FID then uses them, as ADM's
evaluator does, and precision/recall use its ``arr_0`` images when present.

Features: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-Inception port used for FID), loaded from the
local file ``--inception-weights``: nothing is downloaded. The file is torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (its release v0.2.0 on GitHub, toshas/torch-fidelity), fetched once
by hand; see docs/imagenet.md.

- FID: Fréchet distance of Gaussians fitted to the 2048-d pool features (Σ unbiased), ``freeflow.frechet``.
- Inception Score: ``exp E_x KL(p(y|x) ‖ p(y))`` from the 1008-way logits without bias (torch-fidelity's
  ``logits_unbiased``), mean ± std over 10 consecutive splits (no shuffle).
- Precision / recall (Kynkäänniemi et al. 2019, k = 3): a sample is *precise* if it lies inside the k-NN ball of
  some reference feature; a reference feature is *recalled* if it lies inside the k-NN ball of some sample
  (k-th neighbour within its own set, itself excluded).

Sharded over ``torchrun`` ranks: rank r reads rows ``[r·N/W, (r+1)·N/W)`` one batch at a time (the images are never
all in memory: the ``.npz`` member is read in place), and rank 0 gathers the features and writes a JSON file and a
one-line summary.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import types
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from .distributed import init_processes
from .frechet import frechet_distance

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
POOL_DIM, LOGITS_DIM = 2048, 1008


# -- Inception ---------------------------------------------------------------------------------

def inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class.

    torch-fidelity's package ``__init__`` also imports its CLIP/VGG/dataset modules, which import torchvision; PyPI's
    torchvision is a CUDA build that cannot load next to a CPU-only torch. The Inception module itself needs only
    torch, so when the package import fails for that reason the module is loaded without the package ``__init__``.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            raise ImportError("python -m freeflow.evaluate needs torch-fidelity: pip install 'freeflow[eval]'") from e
    except (ImportError, RuntimeError, OSError):
        pass
    return _import_without_package_init("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def _import_without_package_init(name):
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("python -m freeflow.evaluate needs torch-fidelity: pip install 'freeflow[eval]'")
    saved = sys.modules.get("torch_fidelity")
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stub
    try:
        return importlib.import_module(name)
    finally:  # the stub must not stand in for the package anywhere else
        if saved is not None:
            sys.modules["torch_fidelity"] = saved
        else:
            sys.modules.pop("torch_fidelity", None)


def load_inception(weights_path: str, device="cpu"):
    """The Inception-v3 feature extractor with the weights in ``weights_path`` (a local state-dict file)."""
    if not weights_path:
        raise ValueError(f"--inception-weights is required: a local copy of {INCEPTION_FILE} ({INCEPTION_URL})")
    if not os.path.isfile(weights_path):
        raise ValueError(f"--inception-weights {weights_path!r} is not a file; download {INCEPTION_FILE} once "
                         f"from {INCEPTION_URL} (see docs/imagenet.md)")
    cls = inception_class()
    try:
        net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path)
    except Exception as e:  # wrong file: torch.load or load_state_dict fails
        raise ValueError(f"--inception-weights {weights_path!r} is not torch-fidelity's Inception-v3 state dict "
                         f"({type(e).__name__}: {str(e)[:300]})") from e
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net, images: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(B, H, W, 3)`` → (pool features ``(B, 2048)``, unbiased logits ``(B, 1008)``), float32 on the CPU."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
    pool, logits = net(x)
    return pool.float().cpu(), logits.float().cpu()


# -- image sources -----------------------------------------------------------------------------

class NpzImages:
    """An ADM-style ``.npz``: ``arr_0`` uint8 ``(N, H, W, 3)`` read in place batch by batch, and/or ``mu``/``sigma``."""

    def __init__(self, path: str, arg: str):
        self.path, self.arg = path, arg
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{arg} {path!r} is not a readable .npz file ({e})") from e
        names = set(self.zip.namelist())
        self.stats = None
        if {"mu.npy", "sigma.npy"} <= names:
            with np.load(path) as data:
                mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
                raise ValueError(f"{arg} {path!r}: mu must be ({POOL_DIM},) and sigma ({POOL_DIM}, {POOL_DIM}) "
                                 f"(Inception pool features), got {mu.shape} and {sigma.shape}")
            self.stats = (mu, sigma)
        self.n = 0
        if "arr_0.npy" in names:
            with self.zip.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                self.offset = f.tell()
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ValueError(f"{arg} {path!r}: arr_0 must be uint8 images (N, H, W, 3) in C order, as ADM's "
                                 f"batches and python -m freeflow.sample write, got {dtype} {shape}")
            if shape[0] == 0:
                raise ValueError(f"{arg} {path!r}: arr_0 holds no images")
            self.n, self.hwc = shape[0], shape[1:]
        elif self.stats is None:
            raise ValueError(f"{arg} {path!r} holds neither arr_0 (uint8 images) nor mu/sigma; "
                             f"it has {sorted(n[:-4] for n in names)}")

    def batches(self, start: int, stop: int, batch: int):
        row = int(np.prod(self.hwc))
        with self.zip.open("arr_0.npy") as f:
            f.seek(self.offset + start * row)
            for i in range(start, stop, batch):
                m = min(batch, stop - i)
                yield np.frombuffer(f.read(m * row), np.uint8).reshape(m, *self.hwc).copy()


class FolderImages:
    """Image files in a folder (sorted by name), converted to RGB uint8 a batch at a time."""

    stats = None

    def __init__(self, path: str, arg: str):
        self.path, self.arg = path, arg
        self.files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f"{arg} {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.n = len(self.files)

    def batches(self, start: int, stop: int, batch: int):
        from PIL import Image

        for i in range(start, stop, batch):
            arrs = [np.asarray(Image.open(os.path.join(self.path, f)).convert("RGB"))
                    for f in self.files[i: min(i + batch, stop)]]
            if len({a.shape for a in arrs}) > 1:
                raise ValueError(f"{self.arg} {self.path!r}: images of one batch differ in size "
                                 f"({sorted({a.shape for a in arrs})}); resize them to one size first")
            yield np.stack(arrs)


def open_images(path: str, arg: str):
    """An ``.npz`` file or a folder of images; errors name ``arg``."""
    if os.path.isdir(path):
        return FolderImages(path, arg)
    if not os.path.isfile(path):
        raise ValueError(f"{arg} {path!r} does not exist (expected an .npz file or a folder of images)")
    return NpzImages(path, arg)


# -- features over ranks -----------------------------------------------------------------------

def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous rows ``[r·n/W, (r+1)·n/W)`` of rank r."""
    return rank * n // world, (rank + 1) * n // world


def _gather_rows(local: torch.Tensor, n: int, procs) -> torch.Tensor | None:
    """Every rank's contiguous rows, in order, on rank 0 (None elsewhere)."""
    if procs.world == 1:
        return local
    sizes = [rank_range(n, r, procs.world)[1] - rank_range(n, r, procs.world)[0] for r in range(procs.world)]
    padded = local.new_zeros(max(sizes), local.shape[1])
    padded[: len(local)] = local
    padded = padded.to(procs.device)  # NCCL needs CUDA tensors
    chunks = [torch.zeros_like(padded) for _ in range(procs.world)] if procs.main else None
    dist.gather(padded, chunks, dst=0)
    if not procs.main:
        return None
    return torch.cat([c[:s].cpu() for c, s in zip(chunks, sizes)])


def extract(source, net, procs, batch: int, log=None):
    """(pool ``(N, 2048)``, logits ``(N, 1008)``) of all of ``source``'s images on rank 0 (None elsewhere)."""
    start, stop = rank_range(source.n, procs.rank, procs.world)
    pools, logits = [torch.empty(0, POOL_DIM)], [torch.empty(0, LOGITS_DIM)]
    for i, images in enumerate(source.batches(start, stop, batch)):
        p, lg = inception_features(net, images, procs.device)
        pools.append(p)
        logits.append(lg)
        if log is not None and procs.main and i % 20 == 0:
            log(f"[evaluate] {source.arg}: {min(start + (i + 1) * batch, stop)}/{stop} rows of rank 0")
    return (_gather_rows(torch.cat(pools), source.n, procs), _gather_rows(torch.cat(logits), source.n, procs))


# -- metrics -----------------------------------------------------------------------------------

def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """μ and Σ (unbiased, float64) of features ``(N, d)``."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Mean and std over ``splits`` consecutive splits of ``exp E KL(p(y|x) ‖ p(y))``; p = softmax(logits)."""
    lg = torch.as_tensor(logits).double()
    n = lg.shape[0]
    splits = max(1, min(splits, n))
    log_p = lg.log_softmax(1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits: (i + 1) * n // splits]
        log_marginal = part.exp().mean(0).log()
        scores.append(math.exp(float((part.exp() * (part - log_marginal)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of ``x`` to its k-th nearest other row (the row itself is the 0-th)."""
    return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(chunk)])


def _inside_any_ball(q: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(b, centres) <= radii[None]).any(1) for b in q.split(chunk)])


def precision_recall(samples, reference, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``samples`` against ``reference`` features."""
    gen, ref = torch.as_tensor(samples).float(), torch.as_tensor(reference).float()
    for name, f in (("samples", gen), ("reference", ref)):
        if f.dim() != 2 or f.shape[0] <= k:
            raise ValueError(f"precision/recall with k = {k} need more than {k} {name} features, got {tuple(f.shape)}")
    precision = _inside_any_ball(gen, ref, _knn_radii(ref, k, chunk), chunk).double().mean()
    recall = _inside_any_ball(ref, gen, _knn_radii(gen, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


# -- CLI ---------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="python -m freeflow.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", help="samples: an .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images")
    p.add_argument("--ref", required=True,
                   help="reference: an ADM reference batch .npz (arr_0 images and/or mu/sigma) or a folder of images")
    p.add_argument("--inception-weights", default=os.environ.get("FREEFLOW_INCEPTION_WEIGHTS", ""),
                   help=f"local {INCEPTION_FILE} (torch-fidelity's Inception-v3; env FREEFLOW_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward, per process")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    p.add_argument("--is-splits", type=int, default=10, help="splits of the Inception Score")
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall (they need the reference images)")
    p.add_argument("--json", default="", help="output JSON (default: SAMPLES.eval.json beside the samples)")
    return p


def summary_line(r: dict) -> str:
    parts = [f"FID {r['fid']:.3f}", f"IS {r['inception_score']:.2f} ± {r['inception_score_std']:.2f}"]
    if r.get("precision") is not None:
        parts += [f"precision {r['precision']:.4f}", f"recall {r['recall']:.4f}"]
    return " | ".join(parts) + f" ({r['num_samples']} samples vs {r['ref']})"


def evaluate(a, procs, log=print) -> dict | None:
    """The metrics on rank 0 (None on the other ranks)."""
    samples = open_images(a.samples, "SAMPLES")
    if isinstance(samples, NpzImages) and samples.n == 0:
        raise ValueError(f"SAMPLES {a.samples!r} holds only mu/sigma: the samples must be images (arr_0)")
    ref = open_images(a.ref, "--ref")
    net = load_inception(a.inception_weights, procs.device)
    gen_pool, gen_logits = extract(samples, net, procs, a.batch_size, log)
    ref_pool = None
    if ref.n and (ref.stats is None or not a.no_pr):
        ref_pool, _ = extract(ref, net, procs, a.batch_size, log)
    if not procs.main:
        return None
    mu, sigma = gaussian_stats(gen_pool.numpy())
    mu_ref, sigma_ref = ref.stats if ref.stats is not None else gaussian_stats(ref_pool.numpy())
    is_mean, is_std = inception_score(gen_logits, a.is_splits)
    result = dict(fid=frechet_distance(mu, sigma, mu_ref, sigma_ref), inception_score=is_mean,
                  inception_score_std=is_std, precision=None, recall=None, num_samples=samples.n,
                  num_reference=ref.n, ref_stats="mu/sigma of the reference file" if ref.stats is not None
                  else "reference images", samples=a.samples, ref=a.ref, inception_weights=a.inception_weights,
                  k=a.k, is_splits=a.is_splits, world_size=procs.world)
    if not a.no_pr:
        if ref_pool is None:
            log("[evaluate] precision/recall skipped: --ref holds no images (arr_0)")
        else:
            result["precision"], result["recall"] = precision_recall(gen_pool, ref_pool, a.k)
    return result


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.batch_size < 1 or a.k < 1 or a.is_splits < 1:
        print(f"python -m freeflow.evaluate: error: --batch-size, --k and --is-splits must be positive, got "
              f"{a.batch_size}, {a.k}, {a.is_splits}", file=sys.stderr)
        return 2
    procs = init_processes()
    try:
        result = evaluate(a, procs, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, ImportError) as e:
        print(f"python -m freeflow.evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        procs.close()
    if result is not None:
        path = a.json or (a.samples.rstrip("/") + ".eval.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

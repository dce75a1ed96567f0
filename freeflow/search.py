"""Inference-time noise search (docs/design.md §3): the one-step student is a cheap proxy for the teacher.

For each sample, ``K`` candidate noises ``z_1..z_K`` go through the student in one step
(``x_k = z_k - F_θ(z_k, 1)``, K NFE); a verifier scores ``x_k`` for the sample's class; the teacher's
multi-step CFG sampler starts from the best noise. The student and the teacher share the prior and, after
distillation, nearly the same noise → sample map, so a good student sample marks a good teacher noise.

NFE counts network forward rows per sample: the student costs 1 per candidate (γ is one of its inputs: no
CFG pair), the teacher 2 per guided evaluation and 1 outside the guidance interval. Verifier calls are
reported apart (``verifier_calls``): they are a classifier, not the generator.

Verifiers are callables ``verifier(x, y) -> scores (N,)``, higher is better:

- :class:`ClassifierVerifier` — ``log p(y | x)`` of a classifier returning logits;
- ``load_verifier("mnist")`` — the demo's bundled ``MnistFeatureNet`` as that classifier;
- ``load_verifier("path/to/classifier.pt")`` — a TorchScript classifier file, or a ``torch.export`` archive
  ``*.pt2`` (e.g. an ImageNet ResNet with its preprocessing; it gets images in [-1, 1] and returns logits);
- ``load_verifier("package.module:function")`` — any importable callable ``f(x, y) -> (N,)``.

``python -m freeflow.search --student runs/freeflow-mnist/student_ema.pt`` measures search + teacher against the
teacher alone at equal total NFE on the bundled demo (FD and classifier accuracy); docs/search.md has the figures.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from .distill import TeacherAdapter


class ClassifierVerifier:
    """``log p(y | x)`` under ``classifier(x) -> logits (N, C)`` (``preprocess`` applied to ``x`` first)."""

    def __init__(self, classifier, preprocess=None):
        self.classifier, self.preprocess = classifier, preprocess

    @torch.no_grad()
    def __call__(self, x, y):
        x = self.preprocess(x) if self.preprocess is not None else x
        logits = self.classifier(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the verifier's classifier must return logits (N, C), got {tuple(logits.shape)}")
        return logits.float().log_softmax(1).gather(1, y.view(-1, 1).long()).squeeze(1)


def load_verifier(spec: str, device="cpu"):
    """A verifier from ``--verifier``: ``"mnist"``, a TorchScript classifier file, or ``module:callable``."""
    if spec == "mnist":
        from .demo.features import load_feature_net

        net = load_feature_net().to(device)
        return ClassifierVerifier(net, preprocess=lambda x: x.float().clamp(-1, 1))
    if os.path.isfile(spec) and spec.endswith(".pt2"):  # torch.export archive (TorchScript's successor)
        try:
            module = torch.export.load(spec).module()
        except Exception as e:
            raise ValueError(f"--verifier {spec!r} is not a torch.export archive ({e})") from e
        return ClassifierVerifier(module)
    if os.path.isfile(spec):
        try:
            module = torch.jit.load(spec, map_location=device).eval()
        except Exception as e:
            raise ValueError(f"--verifier {spec!r} is a file but not a TorchScript module ({e})") from e
        return ClassifierVerifier(module)
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--verifier {spec!r}: cannot import {attr!r} from {mod_name!r} ({e})") from e
        if not callable(obj):
            raise ValueError(f"--verifier {spec!r} is not callable")
        return obj
    raise ValueError(f"--verifier must be 'mnist', a TorchScript file or module:callable, got {spec!r} "
                     "(no such file)")


class _RowCounter:
    """Wraps a network and counts the rows it is called on (one row = one NFE of one sample)."""

    def __init__(self, model):
        self.model, self.rows = model, 0
        self.config = getattr(model, "config", None)

    def __call__(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.model(x, *args, **kwargs)


@dataclass
class SearchResult:
    samples: torch.Tensor
    """Teacher samples from the chosen noises (N, C, H, W)."""
    noises: torch.Tensor
    """The chosen noises (N, C, H, W)."""
    scores: torch.Tensor
    """Verifier scores of every candidate's one-step sample (N, K)."""
    best: torch.Tensor
    """Index of the chosen candidate per sample (N,)."""
    nfe: float
    """Network evaluations per sample: K (student) + the teacher's."""
    verifier_calls: int
    """Verifier evaluations per sample (K)."""


class NoiseSearch:
    """``search(z (N, K, C, H, W), y, gw)``: K candidates per sample through the student, the best to the teacher.

    ``teacher`` is a :class:`TeacherAdapter` (or a model it can wrap); ``decode`` maps model space to the
    verifier's images (a VAE for latent models; identity by default).
    """

    def __init__(self, student, teacher, verifier, *, method="heun", steps=32, interval=(0.0, 1.0), decode=None):
        self.student, self.verifier = student, verifier
        if not isinstance(teacher, TeacherAdapter):
            teacher = TeacherAdapter(teacher, teacher.config.num_classes)
        self.teacher = teacher
        self.method, self.steps, self.interval = method, steps, tuple(interval)
        self.decode = decode if decode is not None else (lambda x: x)

    @torch.no_grad()
    def __call__(self, z, y, gw) -> SearchResult:
        if z.dim() < 3:
            raise ValueError(f"z must be (N, K, ...) candidate noises, got shape {tuple(z.shape)}")
        n, k = z.shape[:2]
        flat = z.flatten(0, 1)
        yk, gwk = y.repeat_interleave(k), gw.repeat_interleave(k)
        x1 = self.student.sample(flat, yk, gwk)
        scores = self.verifier(self.decode(x1), yk).reshape(n, k).float()
        best = scores.argmax(1)
        noises = z[torch.arange(n, device=z.device), best]
        counter = _RowCounter(self.teacher.model)
        counted = TeacherAdapter(counter, self.teacher.num_classes, family=self.teacher.family,
                                 autocast_dtype=self.teacher.autocast_dtype)
        samples = counted.sample(noises, y, gw, method=self.method, steps=self.steps, interval=self.interval)
        return SearchResult(samples, noises, scores, best, k + counter.rows / n, k)


def teacher_nfe(teacher: TeacherAdapter, z, y, gw, **solver) -> tuple[torch.Tensor, float]:
    """The teacher's samples from ``z`` and its network evaluations per sample (CFG pairs count 2)."""
    counter = _RowCounter(teacher.model)
    counted = TeacherAdapter(counter, teacher.num_classes, family=teacher.family, autocast_dtype=teacher.autocast_dtype)
    return counted.sample(z, y, gw, **solver), counter.rows / z.shape[0]


# -- the demo measurement ----------------------------------------------------------------------

def _parse_pairs(text):
    """'8x2,8x4' → [(8, 2), (8, 4)]: candidates × teacher steps."""
    out = []
    for item in text.split(","):
        k, _, s = item.partition("x")
        out.append((int(k), int(s)))
    return out


def run_teacher_path(student_path: str) -> str:
    """The teacher a demo student was distilled from, as its run's ``config.json`` (beside the student) records
    it; the demo preset's teacher for a student without one."""
    from .demo import ASSETS_DIR, DEMO_TEACHER_FILE

    cfg_path = os.path.join(os.path.dirname(os.path.abspath(student_path)), "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            path = json.load(f).get("teacher_path", "")
        if path:
            return path
    return str(ASSETS_DIR / DEMO_TEACHER_FILE)


def demo_table(student_path, *, samples=500, gw=2.0, settings=((8, 2), (8, 4), (16, 4)), method="heun", seed=0,
               batch=250, log=print, teacher_path: str = "") -> dict:
    """Search + teacher against the teacher alone at equal total NFE on the bundled MNIST demo.

    The teacher-alone step count is the largest whose NFE does not exceed the search's total (Heun: 2·(2S - 1) per
    sample with CFG, so S' = S + K/4; Euler: S' = S + K/2). Scores: FD to the 5,000 real digits and the accuracy of
    the bundled classifier on the intended classes (the same network is the verifier: accuracy flatters the search).
    """
    from . import solvers
    from .demo.features import load_feature_net, mnist_fd
    from .models import FlowMapStudent, load_checkpoint

    torch.set_num_threads(1)
    teacher_model = load_checkpoint(teacher_path or run_teacher_path(student_path), backend="reference").eval()
    teacher = TeacherAdapter(teacher_model, teacher_model.config.num_classes)
    student = FlowMapStudent(load_checkpoint(student_path, backend="reference").eval())
    net = load_feature_net()
    verifier = load_verifier("mnist")
    c = teacher_model.config
    shape = (c.in_channels, c.input_size, c.input_size)
    kmax = max(k for k, _ in settings)
    g = torch.Generator().manual_seed(seed)
    z_all = torch.randn(samples, kmax, *shape, generator=g)  # candidate 0 is the teacher-alone noise
    y_all = torch.arange(samples) % c.num_classes
    gw_all = torch.full((samples,), float(gw))

    def score(x):
        with torch.no_grad():
            pred = torch.cat([net(b.clamp(-1, 1)).argmax(1) for b in x.split(500)])
        return dict(fd=mnist_fd(x, net=net), accuracy=float((pred == y_all).float().mean()))

    def run_teacher(steps):
        outs, nfe = [], 0.0
        for i in range(0, samples, batch):
            x, nfe = teacher_nfe(teacher, z_all[i:i + batch, 0], y_all[i:i + batch], gw_all[i:i + batch],
                                 method=method, steps=steps)
            outs.append(x)
        return torch.cat(outs), nfe

    def per_step(steps):  # CFG: 2 rows per evaluation over the whole interval (1 without guidance)
        return (2 if gw != 1.0 else 1) * solvers.nfe(method, steps)

    rows, cache = [], {}
    t0 = time.time()
    x = torch.cat([student.sample(z_all[i:i + batch, 0], y_all[i:i + batch], gw_all[i:i + batch])
                   for i in range(0, samples, batch)])
    rows.append(dict(sampler="student, 1 step", nfe=1, **score(x)))
    for k, s in settings:
        search = NoiseSearch(student, teacher, verifier, method=method, steps=s)
        outs, nfe = [], 0.0
        for i in range(0, samples, batch):
            res = search(z_all[i:i + batch, :k], y_all[i:i + batch], gw_all[i:i + batch])
            outs.append(res.samples)
            nfe = res.nfe
        rows.append(dict(sampler=f"search K={k} + teacher {method} {s} steps", nfe=nfe, **score(torch.cat(outs))))
        log(f"[search] {rows[-1]}")
        # the teacher alone at the same total NFE (the step count whose NFE is closest from below)
        s_eq = max(st for st in range(1, 200) if per_step(st) <= nfe)
        for st in (s, s_eq):
            if st not in cache:
                xt, nfe_t = run_teacher(st)
                cache[st] = dict(sampler=f"teacher {method} {st} steps", nfe=nfe_t, **score(xt))
                log(f"[search] {cache[st]}")
    rows += [cache[st] for st in sorted(cache)]
    return dict(samples=samples, gw=gw, method=method, seed=seed, rows=rows, seconds=time.time() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m freeflow.search",
                                description="Noise search on the bundled MNIST demo: search + teacher against the "
                                            "teacher alone at equal total NFE (FD, classifier accuracy).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True, help="a demo student (OUT/student_ema.pt of python -m freeflow.train)")
    p.add_argument("--samples", type=int, default=500, help="samples per sampler (classes balanced)")
    p.add_argument("--gw", type=float, default=2.0, help="guidance weight γ")
    p.add_argument("--settings", default="8x2,8x4,16x4", help="comma-separated KxS: K candidates, S teacher steps")
    p.add_argument("--method", choices=("euler", "heun"), default="heun", help="teacher solver")
    p.add_argument("--seed", type=int, default=0, help="seed of the noises")
    p.add_argument("--json", default="", help="also write the table here")
    p.add_argument("--teacher", default="", help="teacher checkpoint (default: the one the student's run distilled, "
                                                   "from config.json beside --student)")
    a = p.parse_args(argv)
    if not os.path.isfile(a.student):
        print(f"python -m freeflow.search: error: --student {a.student!r} is not a file", file=sys.stderr)
        return 2
    if a.teacher and not os.path.isfile(a.teacher):
        print(f"python -m freeflow.search: error: --teacher {a.teacher!r} is not a file", file=sys.stderr)
        return 2
    res = demo_table(a.student, samples=a.samples, gw=a.gw, settings=_parse_pairs(a.settings), method=a.method,
                     seed=a.seed, teacher_path=a.teacher)
    print(f"\n{a.samples} samples, γ = {a.gw}, teacher {a.method}:")
    print("| sampler | NFE | FD | accuracy |\n|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['sampler']} | {r['nfe']:g} | {r['fd']:.2f} | {100 * r['accuracy']:.1f} % |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

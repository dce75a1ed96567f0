"""The 2-D Gaussian mixture: a problem whose teacher and exact one-step map are known in closed form.

Data: 8 modes on the circle of radius 2, std σ = 0.15; class c owns the modes 2k + c (2 classes).
Under ``x_t = (1 - t)·x + t·n`` component k gives ``x_t ~ N((1 - t)μ_k, s_t²I)``, ``s_t² = (1 - t)²σ² + t²``
and ``E[n - x | x_t, k] = (t - (1 - t)σ²)/s_t² · (x_t - (1 - t)μ_k) - μ_k``; the teacher velocity is the
posterior-weighted mixture of these. The exact one-step target is the teacher ODE integrated from
t = 1 to 0 with dopri5 at rtol = atol = 1e-9 in float64 (torchdiffeq).

The student is the analogue of docs/design.md §2's initialisation: the teacher's velocity at t = 1 plus a
zero-initialised MLP, so at step 0 it is exactly one Euler step of the teacher. The aux network is the
teacher plus a zero-initialised MLP. The experiment (``python -m freeflow.experiments gmm``) records the
mean distance to the exact endpoint against step for prediction only, correction only and both, next to the
teacher's Euler sampler at 1-8 steps.
"""
from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from ..conventions import one_step_sample
from ..distill import DistillConfig, Distiller
from .common import environment, plot, write_json

SIGMA = 0.15
NUM_CLASSES = 2
MEANS = torch.stack([2 * torch.cos(torch.arange(8) * math.pi / 4),
                     2 * torch.sin(torch.arange(8) * math.pi / 4)], 1).double()
MODE_CLASS = torch.arange(8) % NUM_CLASSES
# k = 0 and a small α: on a 2-D problem the adaptive weight starves the large-δ samples and the
# aux-estimated Δ_c is mostly estimation noise, which λ would scale up to the prediction's size (docs/distill.md).
CONFIG = dict(power=0.0, alpha=0.1, gw_min=1.0, gw_max=1.0)
VARIANTS = {"both": {}, "prediction only": {"pred_fraction": 1.0}, "correction only": {"pred_fraction": 0.0},
            "alpha 0.03": {"alpha": 0.03}, "alpha 0.3": {"alpha": 0.3}, "alpha 1": {"alpha": 1.0},
            "fixed lambda 0.1": {"balance": "fixed", "alpha": 0.1},
            # the aux network's pace (training options, not DistillConfig fields)
            "aux updates 4": {"aux_updates": 4}, "aux lr x3": {"aux_lr": 6e-3},
            # the correction with an exact g (Monte Carlo velocity of the student's own samples)
            "oracle aux": {"oracle_aux": True},
            # a student too small to represent the map: the prediction objective alone is then biased
            "small student": {"student_width": 16},
            "small student prediction only": {"student_width": 16, "pred_fraction": 1.0},
            "small student alpha 1": {"student_width": 16, "alpha": 1.0},
            "small student oracle aux": {"student_width": 16, "oracle_aux": True},
            "small student aux updates 4": {"student_width": 16, "aux_updates": 4},
            "small student aux lr x3": {"student_width": 16, "aux_lr": 6e-3}}
DEFAULT_VARIANTS = ("both", "prediction only", "correction only")


def gmm_velocity(x, t, y):
    """Closed-form ``E[n - x | x_t]`` of class ``y``'s mixture (``y = NUM_CLASSES``: all 8 modes)."""
    mu = MEANS.to(x.dtype)
    t = t.to(x.dtype).view(-1, 1, 1)
    s2 = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    diff = x[:, None, :] - (1 - t) * mu[None]
    logits = -(diff ** 2).sum(-1) / (2 * s2[..., 0])
    member = (MODE_CLASS[None, :] == y[:, None]) | (y[:, None] == NUM_CLASSES)
    weights = logits.masked_fill(~member, float("-inf")).softmax(-1)[..., None]
    per_mode = (t - (1 - t) * SIGMA ** 2) / s2 * diff - mu[None]
    return (weights * per_mode).sum(1)


def _features(s):
    f = torch.arange(1, 3, dtype=s.dtype) * math.pi
    return torch.cat([torch.cos(s[:, None] * f), torch.sin(s[:, None] * f)], 1)


def _mlp(width, depth):
    layers = [nn.Linear(2 + 16 + 4, width), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.SiLU()]
    net = nn.Sequential(*layers, nn.Linear(width, 2))
    nn.init.zeros_(net[-1].weight)  # starts exactly at the teacher
    nn.init.zeros_(net[-1].bias)
    return net


class Student(nn.Module):
    """``F(z, δ, y, γ) = u(z, t = 1 | y) + MLP(z, δ, y)``: starts as the teacher's Euler step."""

    def __init__(self, width=128):
        super().__init__()
        self.emb = nn.Embedding(NUM_CLASSES, 16)
        self.net = _mlp(width, 3)

    def forward(self, z, delta, y, gw):
        return gmm_velocity(z, torch.ones_like(delta), y) + self.net(torch.cat([z, self.emb(y), _features(delta)], 1))


class Aux(nn.Module):
    """``g_ψ(x, t, y, γ) = u(x, t | y) + MLP``: initialised from the teacher."""

    def __init__(self, width=128):
        super().__init__()
        self.emb = nn.Embedding(NUM_CLASSES, 16)
        self.net = _mlp(width, 2)

    def forward(self, x, t, y, gw):
        return gmm_velocity(x, t, y) + self.net(torch.cat([x, self.emb(y), _features(t)], 1))


def student_velocity(student, x, t, y, *, samples=4096, generator=None):
    """The velocity ``E[n - x₁ | x_t]`` of the student's own one-step distribution, by Monte Carlo over ``samples``
    of its samples per class (float64): under ``x_t = (1 - t)·x₁ + t·n`` the posterior over the samples ``x₁ᵢ`` has
    weights ``∝ exp(-‖x_t - (1 - t)x₁ᵢ‖²/2t²)`` and ``E[n - x₁ | x_t, x₁ᵢ] = (x_t - (1 - t)x₁ᵢ)/t - x₁ᵢ``. In two
    dimensions this is what the aux network ``g_ψ`` estimates, without its estimation error."""
    out = torch.empty(x.shape, dtype=torch.float64)
    t = t.double().view(-1, 1)
    for c in y.unique().tolist():
        rows = y == c
        with torch.no_grad():
            z = torch.randn(samples, 2, generator=generator)
            x1 = one_step_sample(student, z, torch.full((samples,), c), torch.ones(samples)).double()
        xt, tc = x[rows].double(), t[rows]
        diff = xt[:, None, :] - (1 - tc[:, :, None]) * x1[None]
        w = (-(diff ** 2).sum(-1) / (2 * tc ** 2)).softmax(-1)[..., None]
        out[rows] = (w * (diff / tc[:, :, None] - x1[None])).sum(1)
    return out.to(x.dtype)


class OracleAux(nn.Module):
    """An aux "network" that returns :func:`student_velocity` of the current student: the correction with an
    exact ``g``, to tell the aux network's estimation error apart from the correction objective itself. Its one
    parameter (times zero) only keeps the optimizer and the aux loss well-formed."""

    def __init__(self, student, samples=4096):
        super().__init__()
        self.student, self.samples = [student], samples  # a list: not a submodule, its parameters stay the student's
        self.unused = nn.Parameter(torch.zeros(()))
        self.generator = torch.Generator().manual_seed(1234)

    def forward(self, x, t, y, gw):
        return student_velocity(self.student[0], x, t, y, samples=self.samples, generator=self.generator) \
            + 0 * self.unused


def exact_endpoint(z, y):
    """The teacher ODE from t = 1 to 0 (dopri5, rtol = atol = 1e-9, float64)."""
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise ImportError("the GMM experiment needs torchdiffeq: pip install 'freeflow[sample]'") from e

    def field(s, x):  # s = 1 - t runs 0 → 1, so dx/ds = -v
        return -gmm_velocity(x, (1 - s).expand(x.shape[0]), y)
    s = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return odeint(field, z.double(), s, rtol=1e-9, atol=1e-9, method="dopri5")[-1]


def teacher_euler(z, y, steps):
    x = z.double()
    for i in range(steps):
        t = torch.full((x.shape[0],), 1 - i / steps, dtype=torch.float64)
        x = x - gmm_velocity(x, t, y) / steps
    return x


def mean_error(x, target):
    return (x.double() - target).norm(dim=1).mean().item()


def energy_distance(x, target, y):
    """Class-averaged energy distance ``2E‖X - Y‖ - E‖X - X'‖ - E‖Y - Y'‖`` between the samples ``x`` and the exact
    endpoints ``target`` (both per class ``y``): how far the two distributions are, whatever the pairing of
    noises (the correction's job), where :func:`mean_error` measures the per-noise map (the prediction's)."""
    x, target, out = x.double(), target.double(), []
    for c in range(NUM_CLASSES):
        a, b = x[y == c], target[y == c]
        out.append(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
    return float(torch.stack(out).mean())


def train_step(distiller, student_opt, aux_opt, batch_size, generator):
    """One single-process optimizer step on the student and (when there is one) the aux; returns the metrics."""
    student_opt.zero_grad(set_to_none=True)
    aux_opt.zero_grad(set_to_none=True)
    out = distiller.losses(batch_size, generator)
    out["student"].backward()
    if out["aux"] is not None:
        out["aux"].backward()
    student_opt.step()
    aux_opt.step()
    return {k: v for k, v in out.items() if k not in ("student", "aux")}


def eval_set(n=2000, seed=1):
    """Fixed noises and labels and their exact endpoints."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return z, y, exact_endpoint(z, y)


def aux_diagnostic(student, aux, n=2000, seed=5) -> dict:
    """How good the aux network's ``g`` is where the correction reads it (``x_r`` from the student's samples, r from
    the correction's law): ``E‖g - v‖`` (its error against :func:`student_velocity` ``v``, 16,384 samples per class)
    beside ``E‖v - u‖`` (the true gap to the teacher that the correction should follow) and ``E‖g - u‖`` (the gap it
    does follow)."""
    g = torch.Generator().manual_seed(seed)
    z, y = torch.randn(n, 2, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
    r = torch.sigmoid(0.8 + torch.randn(n, generator=g))
    with torch.no_grad():
        x1 = one_step_sample(student, z, y, torch.ones(n))
        x_r = (1 - r[:, None]) * x1 + r[:, None] * torch.randn(n, 2, generator=g)
        est = aux(x_r, r, y, torch.ones(n)).double()
        v = student_velocity(student, x_r, r, y, samples=16384, generator=g).double()
        u = gmm_velocity(x_r, r, y).double()
    return {"aux_error": float((est - v).norm(dim=1).mean()), "true_gap": float((v - u).norm(dim=1).mean()),
            "aux_gap": float((est - u).norm(dim=1).mean())}


def distil(steps, *, overrides=None, eval_every=0, evals=None, batch_size=256, lr=2e-3, seed=0, return_aux=False):
    """Train a GMM student; returns (student, [(step, error)], last metrics, seconds) (and the aux network last,
    with ``return_aux``).

    ``evals = (z, y, target)`` (default :func:`eval_set`) is scored every ``eval_every`` steps (0: only at the end).
    """
    torch.manual_seed(seed)
    overrides = dict(overrides or {})
    student, aux = Student(width=overrides.pop("student_width", 128)), Aux()
    aux_updates, aux_lr = overrides.pop("aux_updates", 1), overrides.pop("aux_lr", lr)
    if overrides.pop("oracle_aux", False):
        aux = OracleAux(student)
    config = DistillConfig(**{**CONFIG, **overrides})
    distiller = Distiller(student, gmm_velocity, aux, config, sample_shape=(2,), num_classes=NUM_CLASSES)
    student_opt = torch.optim.Adam(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(student_opt, steps)
    aux_opt = torch.optim.Adam(aux.parameters(), lr=aux_lr)
    z, y, target = evals if evals is not None else eval_set()
    gw = torch.ones(len(z))

    def error():
        with torch.no_grad():
            return mean_error(one_step_sample(student, z, y, gw), target)

    curve, generator, metrics = [(0, error())], torch.Generator().manual_seed(seed), {}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        metrics = train_step(distiller, student_opt, aux_opt, batch_size, generator)
        for _ in range(aux_updates - 1 if config.pred_fraction < 1 else 0):  # fresh correction rows each
            aux_opt.zero_grad(set_to_none=True)
            distiller.aux_loss(batch_size, generator).backward()
            aux_opt.step()
        schedule.step()
        if step == steps or (eval_every and step % eval_every == 0):
            curve.append((step, error()))
    out = (student, curve, metrics, time.perf_counter() - start)
    return (*out, aux) if return_aux else out


def add_arguments(p):
    p.add_argument("--steps", type=int, default=1000, help="training steps per variant")
    p.add_argument("--eval-every", type=int, default=50, help="steps between error evaluations")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated variants (default: {', '.join(DEFAULT_VARIANTS)}); "
                        f"known: {', '.join(VARIANTS)}")
    p.add_argument("--tag", default="gmm", help="results file stem (default: gmm → gmm.json, gmm.png)")


def spread(values) -> dict:
    """Mean, population spread and extremes of a per-seed result."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0,
            "min": float(t.min()), "max": float(t.max())}


def run(args) -> dict:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants names unknown variants {unknown}; known: {list(VARIANTS)}")
    evals = eval_set()
    z, y, target = evals
    euler = {n: mean_error(teacher_euler(z, y, n), target) for n in (1, 2, 4, 8)}
    euler_energy = {n: energy_distance(teacher_euler(z, y, n), target, y) for n in (1, 2, 4, 8)}
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {}
    for name in names:
        overrides, runs = VARIANTS[name], []
        for seed in seeds:
            student, curve, metrics, seconds, aux = distil(args.steps, overrides=overrides, evals=evals, seed=seed,
                                                           eval_every=args.eval_every, return_aux=True)
            with torch.no_grad():
                energy = energy_distance(one_step_sample(student, z, y, torch.ones(len(z))), target, y)
            diagnostic = aux_diagnostic(student, aux) if metrics.get("n_corr") else {}
            runs.append({"seed": seed, "curve": curve, "final": curve[-1][1], "energy": energy,
                         "lambda": metrics.get("lambda"), "seconds": seconds, **diagnostic})
            print(f"[gmm] {name} seed {seed}: error {curve[-1][1]:.3f}, energy distance {energy:.4f} after "
                  f"{args.steps} steps ({seconds:.0f} s){' ' + str(diagnostic) if diagnostic else ''}", flush=True)
        variants[name] = {"overrides": overrides, "runs": runs,
                          "final_mean": sum(r["final"] for r in runs) / len(runs),
                          "error": spread([r["final"] for r in runs]),
                          "energy": spread([r["energy"] for r in runs])}
    payload = {**environment(), "config": CONFIG, "steps": args.steps, "eval_points": len(z),
               "teacher_euler": {str(k): v for k, v in euler.items()},
               "teacher_euler_energy": {str(k): v for k, v in euler_energy.items()}, "variants": variants}
    write_json(os.path.join(args.out, f"{args.tag}.json"), payload)
    curves = {}
    for name, v in variants.items():  # the mean over seeds at each evaluated step
        steps = [s for s, _ in v["runs"][0]["curve"]]
        curves[name] = (steps, [sum(r["curve"][i][1] for r in v["runs"]) / len(v["runs"]) for i in range(len(steps))])
    plot(os.path.join(args.out, f"{args.tag}.png"), curves,
         hlines={f"teacher Euler {n} step{'s' if n > 1 else ''}": e for n, e in euler.items()},
         ylabel="mean distance to the exact endpoint",
         title=f"2-D mixture: one-step student vs teacher Euler (mean of {len(seeds)} seeds)")
    return payload

"""``python -m freeflow.train``: FreeFlow distillation, on one process or several (``torchrun``).

Flat, top to bottom, as DiT's ``train.py``: setup (config, processes, teacher, student, aux, optimizers,
resume) → loop (``Distiller.losses`` → backward → all-reduce → clip → step → EMA → log / grid /
checkpoint) → finish (``student_ema.pt``, loss curves, evaluation). With no arguments it runs the
bundled MNIST demo on the CPU. Checkpoints are atomic; a killed run resumes from its newest good
checkpoint and, on the CPU, replays the same losses as an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from .checkpointing import CheckpointDir
from .config import TrainConfig, config_dict, parse_args
from .demo import ASSETS_DIR, DEMO_TEACHER_FILE
from .distill import DistillConfig, Distiller, TeacherAdapter, add_lora, lora_parameters
from .distributed import Processes, all_reduce_mean_, all_reduce_sum, init_processes
from .ema import ema_update_
from .models import DiT, FlowMapStudent, GuidedVelocityNet, load_checkpoint, save_checkpoint, student_depth
from .runlog import MetricsLog, progress
from .viz import decode_latents, load_vae, plot_losses, save_grid

BUNDLED_TEACHERS = {"mnist": str(ASSETS_DIR / DEMO_TEACHER_FILE)}


def teacher_path(cfg: TrainConfig) -> str:
    """The teacher file a run distils: ``--teacher-ckpt``, else its preset's bundled teacher ("" if none)."""
    return cfg.teacher_ckpt or BUNDLED_TEACHERS.get(cfg.preset, "")


def _thread_workload():
    """A fixed CPU workload: ten rounds of GEMM, GELU and LayerNorm on 2,048 × 256 (about 35 ms on one core).
    Of the workloads tried on the 2-core machine (docs/demo.md, Threads) it told the two states apart most
    clearly: 1.8–1.9× faster on 2 threads when idle, 0.91–0.94× when another process held a core."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, 256, generator=g), torch.randn(256, 256, generator=g)

    def work():
        for _ in range(10):
            torch.nn.functional.layer_norm(torch.nn.functional.gelu(x @ w), (256,))
    return work


def probe_threads(cores: int, *, repeats: int = 7, margin: float = 1.2) -> tuple[int, dict]:
    """``(threads, seconds)``: time the workload on 1 thread and on ``cores``, now, and keep ``cores`` only when it
    is at least ``margin`` times faster. On an idle machine the cores win; when another process holds a core,
    OpenMP's spin-waiting workers make every extra thread a loss (docs/demo.md, Threads), and 1 wins. The two
    counts alternate and each keeps its best time, so that a passing disturbance does not favour one."""
    work, seconds = _thread_workload(), {1: math.inf, cores: math.inf}
    before = torch.get_num_threads()
    try:
        for n in seconds:  # warm-up: each count's thread pool and the allocator
            torch.set_num_threads(n)
            work()
        for _ in range(repeats):
            for n in seconds:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                work()
                seconds[n] = min(seconds[n], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return (cores if seconds[1] >= margin * seconds[cores] else 1), seconds


def default_threads(run_dir: str | None = None) -> int:
    """CPU threads for ``--threads 0``.

    - Where OMP_NUM_THREADS is set (torchrun sets 1), torch already follows it.
    - A resumed run keeps the count its ``config.json`` recorded, so that it replays the uninterrupted run (the
      reduction order depends on the thread count).
    - Otherwise :func:`probe_threads` decides from a second of timing on the machine as it is now, not from the
      load average of the minute before (which, right after ``pip install``, said "busy" on an idle machine).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    recorded = os.path.join(run_dir, "config.json") if run_dir else ""
    if recorded and os.path.isfile(recorded):
        try:
            with open(recorded) as f:
                used = json.load(f).get("threads_used")
            if isinstance(used, int) and used >= 1:
                return used
        except (OSError, ValueError):
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores == 1 else probe_threads(cores)[0]


def kernel_environment() -> dict:
    """The ``FREEFLOW_*`` / ``TRITON_INTERPRET`` settings that change which kernels run and how, and the OpenMP
    settings that change the speed (recorded in config.json: a run's numbers depend on them)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("FREEFLOW_")
            or k in ("TRITON_INTERPRET", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}


def load_teacher(cfg: TrainConfig, device) -> DiT:
    path = teacher_path(cfg)
    if not path:
        raise ValueError(f"--preset {cfg.preset} has no bundled teacher: pass --teacher-ckpt PATH")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} not found"
                                + (" (the package was installed without its assets?)" if not cfg.teacher_ckpt else ""))
    backend = None if cfg.backend == "auto" else cfg.backend
    teacher = load_checkpoint(path, family=cfg.teacher_family or None, backend=backend)
    return teacher.to(device).eval().requires_grad_(False)


def build_aux(cfg: TrainConfig, teacher: DiT) -> tuple[GuidedVelocityNet, list]:
    aux = GuidedVelocityNet.from_teacher(teacher)
    if cfg.aux == "full":
        return aux, [p for p in aux.parameters() if p.requires_grad]
    add_lora(aux.net, cfg.lora_rank, targets=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
    aux.net.gw_embedder.requires_grad_(True)  # the new γ input has no pre-trained weights to adapt
    return aux, lora_parameters(aux) + list(aux.net.gw_embedder.parameters())


def check_resumed_depth(cfg: TrainConfig, state: dict, path: str, teacher_depth: int):
    """A checkpoint's student must have the depth this run builds: say which flag resumes it."""
    saved = student_depth(state["student"])
    if saved != teacher_depth + cfg.student_extra_depth:
        raise ValueError(f"{path} holds a student of depth {saved} (the teacher's {teacher_depth} + "
                         f"{saved - teacher_depth}), but --student-extra-depth {cfg.student_extra_depth} builds "
                         f"{teacher_depth + cfg.student_extra_depth}: resume with --student-extra-depth "
                         f"{saved - teacher_depth} (or --config {os.path.join(cfg.out, 'config.json')})")


def start_wandb(cfg: TrainConfig, dcfg: DistillConfig):
    """A Weights & Biases run for ``--wandb PROJECT`` (None when off); the config goes with it."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ValueError("--wandb needs the wandb package (pip install 'freeflow[log]')") from e
    return wandb.init(project=cfg.wandb, config=config_dict(cfg, dcfg), dir=cfg.out,
                      name=os.path.basename(os.path.normpath(cfg.out)))


def trainable_state(module: torch.nn.Module, params: list) -> dict:
    """State of the trainable tensors only (LoRA aux: the adapters, not the frozen teacher copy)."""
    ids = {id(p) for p in params}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if id(v) in ids}


def load_trainable_state(module: torch.nn.Module, params: list, state: dict, what: str):
    """Load what :func:`trainable_state` saved: exactly the trainable tensors, no key missing or left over
    (a LoRA checkpoint resumed with --aux full, or another rank, fails here by name, not silently)."""
    want = set(trainable_state(module, params))
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ValueError(f"{what} does not fit this run's trainable tensors: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (was it saved with other --aux / --lora-rank?)")
    module.load_state_dict(state, strict=False)  # the frozen rest is the teacher's, rebuilt by this run


@torch.no_grad()
def grid_inputs(cfg: TrainConfig, shape, num_classes, device):
    """Fixed noises/classes for the grid, from their own generator (the training stream is untouched)."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)
    n = cfg.grid_size * 2
    z = torch.randn(n, *shape, generator=g).to(device)
    y = (torch.arange(n) % num_classes).to(device)
    gw = torch.full((n,), cfg.eval_gw, device=device)
    return z, y, gw


def write_grid(path, teacher_x, student_x, nrow, vae=None):
    """Rows: teacher (multi-step) over student (1 step), the same noises column by column.

    Latent samples are decoded through ``vae`` when one is given; without it the grid shows their first channel.
    """
    if vae is not None:
        teacher_x, student_x = decode_latents(teacher_x, vae), decode_latents(student_x, vae)
    if teacher_x.shape[1] not in (1, 3):
        teacher_x, student_x = teacher_x[:, :1], student_x[:, :1]
    rows = []
    for i in range(0, teacher_x.shape[0], nrow):
        rows += [teacher_x[i: i + nrow], student_x[i: i + nrow]]
    save_grid(torch.cat(rows), path, nrow)


def step_losses(distiller: Distiller, cfg: TrainConfig, generator, shard, reduce, step: int,
                ckpts: CheckpointDir | None) -> dict:
    """The step's losses; a non-finite one stops the run before the update, naming the last good checkpoint."""
    try:
        out = distiller.losses(cfg.batch_size, generator, shard=shard, reduce=reduce)
        terms = {k: out[k] for k in ("pred_loss", "corr_loss", "aux_loss")}
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} ({terms})")
    except FloatingPointError as e:
        last = ckpts.list() if ckpts is not None else []
        raise FloatingPointError(f"{e} at step {step}; stopped before the update. "
                                 f"Last good checkpoint: {last[-1] if last else 'none'}") from e
    return out


def network_autocast(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of every network (student with its tangent, aux, teacher): bf16 for ``--precision bf16``
    and for ``auto`` on CUDA; None (fp32) otherwise. Master weights, optimizer state, EMA and the loss reductions
    are fp32 either way."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def set_matmul_precision(cfg: TrainConfig, device: torch.device):
    """``--tf32`` / ``--no-tf32``: TF32 for fp32 matmuls and convolutions on CUDA, both switches together."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


@dataclass
class Parts:
    """Everything a training step touches, built by :func:`build_parts` (the trainer, benchmarks/bench_step.py)."""

    teacher: torch.nn.Module
    adapter: TeacherAdapter
    student: torch.nn.Module
    ema: torch.nn.Module
    aux: torch.nn.Module
    student_params: list
    aux_params: list
    opt: torch.optim.Optimizer
    aux_opt: torch.optim.Optimizer
    distiller: Distiller
    generator: torch.Generator


def build_parts(cfg: TrainConfig, dcfg: DistillConfig, teacher: DiT, device, *, networks=None) -> Parts:
    """Student (from the teacher), EMA, aux, both AdamW optimizers, the distiller and the training generator.

    ``networks(student, aux, teacher) -> (student, aux, teacher)`` may swap the networks for other
    implementations with the same parameters before the optimizers are made (benchmarks' plain-PyTorch
    baseline); the trainer passes none."""
    tcfg = teacher.config
    shape = (tcfg.in_channels, *(tcfg.grid[i] * tcfg.patch_size for i in range(2)))
    student = FlowMapStudent.from_teacher(teacher, cfg.student_extra_depth).to(device).train()
    aux, aux_params = build_aux(cfg, teacher)
    aux = aux.to(device).train()
    if networks is not None:
        student, aux, teacher = networks(student, aux, teacher)
        aux_params = [p for p in aux.parameters() if p.requires_grad]
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    dtype = network_autocast(cfg, device)
    adapter = TeacherAdapter(teacher, tcfg.num_classes, autocast_dtype=dtype)
    student_params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(student_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    aux_opt = torch.optim.AdamW(aux_params, lr=cfg.aux_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    distiller = Distiller(student, adapter, aux, dcfg, sample_shape=shape, num_classes=tcfg.num_classes,
                          autocast_dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # identical on every rank (sharded draws)
    return Parts(teacher, adapter, student, ema, aux, student_params, aux_params, opt, aux_opt, distiller, generator)


def compile_networks(parts: Parts, mode: str):
    """``--compile``: the student's ``forward`` and explicit-tangent ``forward_jvp``, the aux network and the
    teacher go through torch.compile (after the EMA copy is made: it stays an eager module). The compiled
    callables replace the modules' call paths in place; parameters and state dicts are the same objects."""
    kw = dict(backend="aot_eager") if mode == "aot_eager" else dict(mode=mode)
    net = parts.student.net
    net.forward_jvp = torch.compile(net.forward_jvp, **kw)  # forward() calls forward_jvp: one graph family
    for module in (parts.aux.net, parts.teacher):
        module.compile(**kw)


def student_lr(cfg: TrainConfig, step: int) -> float:
    """The student's learning rate at ``step`` (1-based) under ``--lr-schedule``: a function of the step alone, so
    a resumed run continues the schedule exactly."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / cfg.steps))
    return cfg.lr


def aux_only_update(parts: Parts, cfg: TrainConfig, *, world: int = 1, shard=None):
    """One aux optimizer update on fresh correction rows (``--aux-updates`` > 1, ``--aux-warmup``)."""
    parts.aux_opt.zero_grad(set_to_none=True)
    loss = parts.distiller.aux_loss(cfg.batch_size, parts.generator, shard=shard)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite aux loss {value} in an aux-only update")
    loss.backward()
    all_reduce_mean_([p.grad for p in parts.aux_params if p.grad is not None], world)
    parts.aux_opt.step()
    return value


def train_step(parts: Parts, cfg: TrainConfig, step: int, *, world: int = 1, shard=None, reduce=None,
               ckpts: CheckpointDir | None = None) -> tuple[dict, torch.Tensor]:
    """One optimizer step of the student and the aux network (losses → backward → all-reduce → clip → step →
    EMA), then ``--aux-updates - 1`` aux-only updates; returns the loss terms and metrics of
    :meth:`Distiller.losses` and the student's gradient norm."""
    for group in parts.opt.param_groups:
        group["lr"] = student_lr(cfg, step)
    parts.opt.zero_grad(set_to_none=True)
    parts.aux_opt.zero_grad(set_to_none=True)
    out = step_losses(parts.distiller, cfg, parts.generator, shard, reduce, step, ckpts)
    out["student"].backward()
    if out["aux"] is not None:
        out["aux"].backward()
    all_reduce_mean_([p.grad for p in parts.student_params if p.grad is not None], world)
    all_reduce_mean_([p.grad for p in parts.aux_params if p.grad is not None], world)
    grad_norm = (torch.nn.utils.clip_grad_norm_(parts.student_params, cfg.grad_clip) if cfg.grad_clip > 0
                 else torch.zeros(()))
    parts.opt.step()
    parts.aux_opt.step()
    ema_update_(parts.ema, parts.student, cfg.ema_decay)
    if out["aux"] is not None:
        for _ in range(cfg.aux_updates - 1):
            aux_only_update(parts, cfg, world=world, shard=shard)
    return out, grad_norm


def run(cfg: TrainConfig, dcfg: DistillConfig, procs: Processes) -> dict:
    # -- setup -----------------------------------------------------------------------------------
    device = procs.device
    if cfg.batch_size % procs.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {procs.world}")
    set_matmul_precision(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        torch.set_num_threads(default_threads(cfg.out if cfg.resume else None))
    torch.manual_seed(cfg.seed)  # model-side randomness (LoRA init); the training stream has its own generator

    teacher = load_teacher(cfg, device)
    tcfg = teacher.config
    num_classes = tcfg.num_classes
    parts = build_parts(cfg, dcfg, teacher, device)
    shape = parts.distiller.sample_shape
    if cfg.compile:
        compile_networks(parts, cfg.compile_mode)
    student, ema, aux, adapter = parts.student, parts.ema, parts.aux, parts.adapter
    opt, aux_opt, generator = parts.opt, parts.aux_opt, parts.generator

    shard = (procs.rank, procs.world) if procs.world > 1 else None
    reduce = all_reduce_sum if procs.world > 1 else None
    step = 0
    ckpts = CheckpointDir(os.path.join(cfg.out, "checkpoints"), cfg.keep_checkpoints)
    state, path = ckpts.load_newest_good() if cfg.resume else (None, None)
    if state is not None:
        check_resumed_depth(cfg, state, path, tcfg.depth)
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        load_trainable_state(aux, parts.aux_params, state["aux"], f"the aux state in {path}")
        opt.load_state_dict(state["opt"])
        aux_opt.load_state_dict(state["aux_opt"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        if procs.main:
            print(f"[freeflow] resumed from {path} at step {step}")
    if procs.main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({**config_dict(cfg, dcfg), "world_size": procs.world, "device": str(device),
                       "threads_used": torch.get_num_threads(), "teacher_path": teacher_path(cfg),
                       "environment": kernel_environment(),
                       "teacher_family": teacher.family, "teacher_config": tcfg.to_dict()}, f, indent=2)
    if step == 0 and cfg.aux_warmup:  # no checkpoint yet: a run killed during the warm-up redoes it, identically
        for _ in range(cfg.aux_warmup):
            aux_loss = aux_only_update(parts, cfg, world=procs.world, shard=shard)
        if procs.main:
            print(f"[freeflow] aux warm-up: {cfg.aux_warmup} updates, last aux loss {aux_loss:.4f}")
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), step) if procs.main else None
    wandb_run = start_wandb(cfg, dcfg) if procs.main else None
    vae = load_vae(cfg.vae, device) if procs.main else None
    grid_z, grid_y, grid_gw = grid_inputs(cfg, shape, num_classes, device)
    grid_teacher = None  # the teacher's half of the grid never changes: computed once, when first needed

    # -- loop ------------------------------------------------------------------------------------
    bar = progress(cfg.steps, step, procs.main)
    start_step = step
    t_last, steps_since = time.time(), 0
    while step < cfg.steps:
        t_step = time.time()
        out, grad_norm = train_step(parts, cfg, step + 1, world=procs.world, shard=shard, reduce=reduce,
                                    ckpts=ckpts)
        if cfg.compile and procs.main and step == start_step:
            print(f"[freeflow] first step with torch.compile ({cfg.compile_mode}): {time.time() - t_step:.1f} s "
                  "(tracing and compiling the networks)", file=sys.stderr)
        step += 1
        steps_since += 1
        bar.update(1)

        if procs.main and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.time()
            row = {"step": step, **{k: v for k, v in out.items() if k not in ("student", "aux")},
                   "grad_norm": float(grad_norm), "steps_per_s": steps_since / max(now - t_last, 1e-9)}
            t_last, steps_since = now, 0
            log.write(row)
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(pred=f"{row['pred_loss']:.4f}", corr=f"{row['corr_loss']:.4f}",
                            aux=f"{row['aux_loss']:.4f}", it_s=f"{row['steps_per_s']:.2f}")
        if procs.main and (step % cfg.ckpt_every == 0 or step == cfg.steps):  # before the grid: never waits on it
            ckpts.save(step, {
                "step": step, "student": student.state_dict(), "ema": ema.state_dict(),
                "aux": trainable_state(aux, parts.aux_params), "opt": opt.state_dict(), "aux_opt": aux_opt.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "config": config_dict(cfg, dcfg)})
        if procs.main and (step % cfg.sample_every == 0 or step == cfg.steps):
            try:
                if grid_teacher is None:
                    grid_teacher = adapter.sample(grid_z, grid_y, grid_gw, steps=cfg.teacher_steps)
                os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
                write_grid(os.path.join(cfg.out, "samples", f"step_{step:07d}.png"), grid_teacher,
                           ema.sample(grid_z, grid_y, grid_gw), cfg.grid_size, vae)
            except Exception as e:  # a grid is a convenience: the run goes on without it
                print(f"[freeflow] warning: sample grid at step {step} not written ({type(e).__name__}: {e})",
                      file=sys.stderr)
    bar.close()

    # -- finish ----------------------------------------------------------------------------------
    if wandb_run is not None:
        wandb_run.finish()
    result = {"steps": step}
    if procs.main:
        save_checkpoint(ema.net, os.path.join(cfg.out, "student_ema.pt"))  # for python -m freeflow.sample
        plot_losses(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "losses.png"))
        if cfg.preset == "mnist" and cfg.evaluate:
            from .demo.evaluate import evaluate_student

            result.update(evaluate_student(ema, adapter, samples=cfg.eval_samples, gw=cfg.eval_gw,
                                           teacher_steps=cfg.teacher_steps, seed=cfg.seed + 777, device=device,
                                           teacher_path=teacher_path(cfg)))
            with open(os.path.join(cfg.out, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
    return result


def main(argv=None) -> int:
    try:
        cfg, dcfg = parse_args(argv)
    except ValueError as e:
        print(f"python -m freeflow.train: error: {e}", file=sys.stderr)
        return 2
    procs = init_processes()
    try:
        run(cfg, dcfg, procs)
    except FloatingPointError as e:
        print(f"[freeflow] {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:  # inputs found wrong once opened (--teacher-ckpt, --vae, --wandb)
        print(f"python -m freeflow.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

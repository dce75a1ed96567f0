"""``python -m freeflow.train``: FreeFlow distillation (DESIGN §3), single process or ``torchrun``.

Flat, top to bottom: setup (config, processes, teacher, student, aux, optimizers, resume) → loop
(Distiller.losses → backward → all-reduce → clip → step → EMA) → log / sample grid / checkpoint →
final checkpoint and evaluation. With no arguments it runs the bundled MNIST demo on the CPU.
Checkpoints are atomic (temp file + rename); a killed run resumes from its newest good checkpoint and,
on the CPU, replays the same losses as an uninterrupted run.
"""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainConfig, config_dict, parse_args
from .distill import DistillConfig, Distiller, TeacherAdapter, add_lora, lora_parameters
from .models import DiT, FlowMapStudent, GuidedVelocityNet, load_checkpoint

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BUNDLED_TEACHERS = {"mnist": os.path.join(ASSETS, "mnist_teacher.pt")}


# ---------------------------------------------------------------------------------------------
#                                      processes
# ---------------------------------------------------------------------------------------------

@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_processes() -> Processes:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on CUDA, gloo on CPU; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Processes(0, 1, device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_mean_(tensors, world: int) -> None:
    """Average gradients across processes in one flat buffer (one collective per step)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out


# ---------------------------------------------------------------------------------------------
#                                     models
# ---------------------------------------------------------------------------------------------

def load_teacher(cfg: TrainConfig, device) -> DiT:
    path = cfg.teacher_ckpt or BUNDLED_TEACHERS.get(cfg.preset, "")
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


def trainable_state(module: torch.nn.Module, params: list) -> dict:
    """State of the trainable tensors only (LoRA aux: the adapters, not the frozen teacher copy)."""
    ids = {id(p) for p in params}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if id(v) in ids}


@torch.no_grad()
def ema_update_(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e = [p for p in ema.parameters() if p.is_floating_point()]
    m = [p.detach() for p in model.parameters() if p.is_floating_point()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


# ---------------------------------------------------------------------------------------------
#                                     checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoint_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out, "checkpoints")


def save_state(path: str, state: dict) -> None:
    """Atomic: a kill during the write leaves the previous checkpoints untouched."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def list_checkpoints(cfg: TrainConfig) -> list[str]:
    return sorted(glob.glob(os.path.join(checkpoint_dir(cfg), "step_*.pt")))


def prune_checkpoints(cfg: TrainConfig) -> None:
    for path in list_checkpoints(cfg)[: -cfg.keep_checkpoints]:
        os.remove(path)
    for tmp in glob.glob(os.path.join(checkpoint_dir(cfg), "*.tmp.*")):  # leftovers of killed saves
        os.remove(tmp)


def load_newest_good(cfg: TrainConfig) -> tuple[dict | None, str | None]:
    """The newest checkpoint that reads back completely (older ones are the fall-back)."""
    for path in reversed(list_checkpoints(cfg)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # truncated or corrupted: set it aside (pruning must not keep it) and go back one
            os.replace(path, path + ".corrupt")
            print(f"[freeflow] set aside unreadable checkpoint {path} ({type(e).__name__}: {e})", file=sys.stderr)
    return None, None


# ---------------------------------------------------------------------------------------------
#                                     logging
# ---------------------------------------------------------------------------------------------

def _row_step(line: str) -> float:
    """Step of a JSONL row; a line cut short by a kill counts as past any checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf


class MetricsLog:
    """JSONL metrics (and TensorBoard when installed); on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        rows = []
        if resume_step > 0 and os.path.exists(path):
            rows = [line for line in open(path) if _row_step(line) <= resume_step]
        with open(path, "w") as f:
            f.writelines(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tb"))
        except Exception:  # tensorboard is optional
            pass

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])


# ---------------------------------------------------------------------------------------------
#                                     samples
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid_inputs(cfg: TrainConfig, shape, num_classes, device):
    """Fixed noises/classes for the grid, from their own generator (the training stream is untouched)."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)
    n = cfg.grid_size * 2
    z = torch.randn(n, *shape, generator=g).to(device)
    y = (torch.arange(n) % num_classes).to(device)
    gw = torch.full((n,), cfg.eval_gw, device=device)
    return z, y, gw


@torch.no_grad()
def teacher_samples(adapter, z, y, gw, steps, interval=(0.0, 1.0)):
    from .solvers import solve

    return solve(adapter.field(y, gw, *interval), z, "heun", steps)


@torch.no_grad()
def write_grid(path, teacher_x, student_x, nrow):
    """Rows: teacher (multi-step) over student (1 step), the same noises column by column."""
    from .viz import save_grid

    if teacher_x.shape[1] not in (1, 3):  # latents: show the first channel (decode with freeflow.sample)
        teacher_x, student_x = teacher_x[:, :1], student_x[:, :1]
    rows = []
    for i in range(0, teacher_x.shape[0], nrow):
        rows += [teacher_x[i: i + nrow], student_x[i: i + nrow]]
    save_grid(torch.cat(rows), path, nrow)


# ---------------------------------------------------------------------------------------------
#                                     the run
# ---------------------------------------------------------------------------------------------

def run(cfg: TrainConfig, dcfg: DistillConfig, procs: Processes) -> dict:
    device = procs.device
    if cfg.batch_size % procs.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {procs.world}")
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # model-side randomness (LoRA init); the training stream has its own generator

    # -- models ----------------------------------------------------------------------------------
    teacher = load_teacher(cfg, device)
    tcfg = teacher.config
    num_classes = tcfg.num_classes
    shape = (tcfg.in_channels, *(tcfg.grid[i] * tcfg.patch_size for i in range(2)))
    autocast = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")) else None
    adapter = TeacherAdapter(teacher, num_classes, autocast_dtype=autocast)
    student = FlowMapStudent.from_teacher(teacher).to(device).train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    aux, aux_params = build_aux(cfg, teacher)
    aux = aux.to(device).train()
    student_params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(student_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    aux_opt = torch.optim.AdamW(aux_params, lr=cfg.aux_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    distiller = Distiller(student, adapter, aux, dcfg, sample_shape=shape, num_classes=num_classes)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # identical on every rank (sharded draws)

    # -- resume ----------------------------------------------------------------------------------
    step = 0
    os.makedirs(checkpoint_dir(cfg), exist_ok=True)
    state, path = load_newest_good(cfg) if cfg.resume else (None, None)
    if state is not None:
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        aux.load_state_dict(state["aux"], strict=False)
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
                       "teacher_family": teacher.family, "teacher_config": tcfg.to_dict()}, f, indent=2)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), step) if procs.main else None

    def checkpoint(at_step):
        if not procs.main:
            return
        save_state(os.path.join(checkpoint_dir(cfg), f"step_{at_step:07d}.pt"), {
            "step": at_step, "student": student.state_dict(), "ema": ema.state_dict(),
            "aux": trainable_state(aux, aux_params), "opt": opt.state_dict(), "aux_opt": aux_opt.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "config": config_dict(cfg, dcfg)})
        prune_checkpoints(cfg)

    # -- sample grid inputs: the teacher's half never changes, so it is computed once ------------
    grid_z, grid_y, grid_gw = sample_grid_inputs(cfg, shape, num_classes, device)
    grid_teacher = None

    # -- loop ------------------------------------------------------------------------------------
    shard = (procs.rank, procs.world) if procs.world > 1 else None
    reduce = all_reduce_sum if procs.world > 1 else None
    bar = _progress(cfg, step, procs.main)
    t_last, steps_since = time.time(), 0
    while step < cfg.steps:
        opt.zero_grad(set_to_none=True)
        aux_opt.zero_grad(set_to_none=True)
        try:
            out = distiller.losses(cfg.batch_size, generator, shard=shard, reduce=reduce)
            terms = {k: out[k] for k in ("pred_loss", "corr_loss", "aux_loss")}
            bad = [k for k, v in terms.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite {', '.join(bad)} ({terms})")
        except FloatingPointError as e:
            last = list_checkpoints(cfg)
            raise FloatingPointError(f"{e} at step {step + 1}; stopped before the update. "
                                     f"Last good checkpoint: {last[-1] if last else 'none'}") from e
        out["student"].backward()
        if out["aux"] is not None:
            out["aux"].backward()
        all_reduce_mean_([p.grad for p in student_params if p.grad is not None], procs.world)
        all_reduce_mean_([p.grad for p in aux_params if p.grad is not None], procs.world)
        grad_norm = (torch.nn.utils.clip_grad_norm_(student_params, cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.zeros(()))
        opt.step()
        aux_opt.step()
        ema_update_(ema, student, cfg.ema_decay)
        step += 1
        steps_since += 1

        if procs.main and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.time()
            row = {"step": step, **{k: v for k, v in out.items() if k not in ("student", "aux")},
                   "grad_norm": float(grad_norm), "steps_per_s": steps_since / max(now - t_last, 1e-9)}
            t_last, steps_since = now, 0
            log.write(row)
            bar.set_postfix(pred=f"{row['pred_loss']:.4f}", corr=f"{row['corr_loss']:.4f}",
                            aux=f"{row['aux_loss']:.4f}", it_s=f"{row['steps_per_s']:.2f}")
        bar.update(1)
        if procs.main and (step % cfg.sample_every == 0 or step == cfg.steps):
            if grid_teacher is None:
                grid_teacher = teacher_samples(adapter, grid_z, grid_y, grid_gw, cfg.teacher_steps)
            with torch.no_grad():
                student_x = ema.sample(grid_z, grid_y, grid_gw)
            os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
            write_grid(os.path.join(cfg.out, "samples", f"step_{step:07d}.png"), grid_teacher, student_x,
                       cfg.grid_size)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint(step)
    bar.close()

    result = {"steps": step}
    if procs.main:
        from .models import save_checkpoint
        from .viz import plot_losses

        save_checkpoint(ema.net, os.path.join(cfg.out, "student_ema.pt"))  # for python -m freeflow.sample

        plot_losses(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "losses.png"))
        if cfg.preset == "mnist" and cfg.evaluate:
            from .evaluate import evaluate_mnist

            result.update(evaluate_mnist(cfg, adapter, ema, device))
            with open(os.path.join(cfg.out, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
    return result


def _progress(cfg, start, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a core dependency, but keep the loop alive without it
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=cfg.steps, initial=start, desc="freeflow", dynamic_ncols=True, file=sys.stdout)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


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
    finally:
        if procs.world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

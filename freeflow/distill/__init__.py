"""Data-free flow map distillation: teacher adapter, objectives, LoRA aux, the per-step engine.

Loads neither the model code nor triton: it depends on torch, ``freeflow.losses``, ``freeflow.solvers``
and the family conventions of ``freeflow.conventions``. Models satisfy its protocols without being
imported:

- student ``student(z, delta, y, gw) -> F`` with one-step map ``z - δ·F`` (optional
  ``forward_jvp(z, delta, y, gw, *, tdelta) -> (F, Ḟ)``);
- teacher ``model(x, t, y)`` with ``model.family`` in {"sit", "repa", "freeflow", "internal"} or a plain
  callable in the internal convention (wrapped by :class:`TeacherAdapter`);
- aux ``aux(x, t, y, gw) -> velocity`` in the internal convention.

The data-based baseline (``MeanFlowDistiller``, ``meanflow.py``) trains a two-time student
``student(z, delta, y, gw, t=t)`` on noised data instead (optional ``forward_jvp(..., tz, tdelta, t, tt)``).
"""
from .engine import DistillConfig, Distiller
from .lora import LoRALinear, add_lora, lora_parameters
from .meanflow import MeanFlowConfig, MeanFlowDistiller
from .objectives import (
    aux_flow_matching_loss,
    balance_weight,
    correction_loss,
    noised,
    prediction_loss,
    prediction_targets,
    sample_delta,
    sample_logit_normal,
    student_and_tangent,
)
from .teacher import TeacherAdapter, as_teacher

__all__ = [
    "DistillConfig", "Distiller",
    "LoRALinear", "add_lora", "lora_parameters",
    "MeanFlowConfig", "MeanFlowDistiller",
    "aux_flow_matching_loss", "balance_weight", "correction_loss", "noised", "prediction_loss",
    "prediction_targets", "sample_delta", "sample_logit_normal", "student_and_tangent",
    "TeacherAdapter", "as_teacher",
]

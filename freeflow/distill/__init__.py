"""Data-free flow map distillation (DESIGN §3): teacher adapter, objectives, LoRA aux, the engine.

Depends on ``freeflow.losses``, the family conventions of ``freeflow.models.conventions`` and torch; models satisfy its protocols without being imported:

- student ``student(z, delta, y, gw) -> F`` with one-step map ``z - δ·F`` (optional
  ``forward_jvp(z, delta, y, gw, *, tdelta) -> (F, Ḟ)``);
- teacher ``model(x, t, y)`` with ``model.family`` in {"sit", "repa", "freeflow", "internal"} or a plain
  callable in the internal convention (wrapped by :class:`TeacherAdapter`);
- aux ``aux(x, t, y, gw) -> velocity`` in the internal convention.
"""
from .engine import DistillConfig, Distiller, flow_map, sample
from .lora import LoRALinear, add_lora, lora_parameters
from .objectives import (aux_flow_matching_loss, balance_weight, correction_loss, noised,
                         prediction_loss, prediction_targets, sample_delta, sample_logit_normal,
                         student_and_tangent)
from .teacher import TeacherAdapter, as_teacher

__all__ = [
    "DistillConfig", "Distiller", "flow_map", "sample",
    "LoRALinear", "add_lora", "lora_parameters",
    "aux_flow_matching_loss", "balance_weight", "correction_loss", "noised", "prediction_loss",
    "prediction_targets", "sample_delta", "sample_logit_normal", "student_and_tangent",
    "TeacherAdapter", "as_teacher",
]

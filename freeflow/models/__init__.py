"""freeflow.models: DiT/SiT/REPA-SiT compatible networks with ``forward_jvp``, FreeFlow students, loaders."""
from ..conventions import FAMILIES
from .checkpoint import check_state_dict, infer_config, infer_family, load_checkpoint, save_checkpoint
from .dit import CONFIGS, DiT, DiTConfig, config_from_name, sincos_pos_embed
from .student import FlowMapStudent, GuidedVelocityNet, student_depth

__all__ = [
    "CONFIGS", "FAMILIES", "DiT", "DiTConfig", "FlowMapStudent", "GuidedVelocityNet", "check_state_dict",
    "config_from_name", "infer_config", "infer_family", "load_checkpoint", "save_checkpoint", "sincos_pos_embed",
    "student_depth",
]

"""freeflow.kernels: DiT building blocks with explicit forward tangents (Triton + PyTorch reference).

Every op has a pure-PyTorch reference (``*_reference``) and, where it pays, a Triton kernel; the public
function dispatches (CUDA → Triton, CPU → reference unless ``TRITON_INTERPRET=1``,
``FREEFLOW_KERNELS=reference|triton`` or ``backend=`` to force). Each ``*_jvp`` op returns
``(out, out_tangent)``: ``out`` carries autograd, ``out_tangent`` is detached (tangents are
stop-gradient in FreeFlow's objectives). Tangent arguments may be ``None`` (zero); a returned tangent is
``None`` only when it is zero by structure (every input tangent it depends on was ``None``).
The Triton ops are autograd Functions with ``jvp`` rules (``torch.func``, ``forward_ad``) and, for
``torch.compile``, ``freeflow::`` torch.library custom ops (``_library``), which they call while compiling.

Modules, one op family each: ``flash_attention`` (JVP flash attention), ``adaln`` (modulate, gated
residual and the fused seam), ``gelu`` (bias + GELU), ``tangent_ops`` (LayerNorm, linear, SiLU, timestep
embedding: tangents without a kernel), ``block`` (the DiT block's fused schedule, which ``freeflow.models``
and ``patch`` run), ``patch`` (``patch_dit``); ``aot`` (compile report and gate) and
``selftest`` (GPU self-test) are command-line tools. No exported name equals a module name.

This package depends on torch (and triton when present) only; it never imports the rest of freeflow.
"""
from ._dispatch import check_backend, use_triton
from .adaln import (
    adaln_modulate,
    adaln_modulate_jvp,
    adaln_modulate_jvp_reference,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_jvp,
    gated_residual_jvp_reference,
    gated_residual_modulate,
    gated_residual_modulate_jvp,
    gated_residual_modulate_jvp_reference,
    gated_residual_modulate_reference,
    gated_residual_reference,
)
from .flash_attention import attention, attention_jvp, attention_jvp_reference, attention_reference
from .gelu import bias_gelu, bias_gelu_jvp, bias_gelu_jvp_reference, bias_gelu_reference, gelu_tanh, gelu_tanh_jvp
from .patch import patch_dit
from .tangent_ops import (
    layer_norm,
    layer_norm_jvp,
    linear,
    linear_jvp,
    silu,
    silu_jvp,
    timestep_embedding,
    timestep_embedding_jvp,
)

__all__ = [
    # dispatch
    "check_backend", "use_triton",
    # attention
    "attention", "attention_jvp", "attention_reference", "attention_jvp_reference",
    # adaLN family
    "adaln_modulate", "adaln_modulate_jvp", "adaln_modulate_reference", "adaln_modulate_jvp_reference",
    "gated_residual", "gated_residual_jvp", "gated_residual_reference", "gated_residual_jvp_reference",
    "gated_residual_modulate", "gated_residual_modulate_jvp", "gated_residual_modulate_reference",
    "gated_residual_modulate_jvp_reference",
    # bias + GELU
    "bias_gelu", "bias_gelu_jvp", "bias_gelu_reference", "bias_gelu_jvp_reference", "gelu_tanh", "gelu_tanh_jvp",
    # tangent-only ops
    "layer_norm", "layer_norm_jvp", "linear", "linear_jvp", "silu", "silu_jvp",
    "timestep_embedding", "timestep_embedding_jvp",
    # model patching
    "patch_dit",
]

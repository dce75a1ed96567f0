"""freeflow.kernels: DiT building blocks with explicit forward tangents (Triton + PyTorch reference).

This package exports the ops a model calls. Every op also has a pure-PyTorch reference with the same signature,
one level down beside its kernel (``freeflow.kernels.adaln.adaln_modulate_reference``, ...), and the public
function dispatches (CUDA → Triton, CPU → reference unless ``TRITON_INTERPRET=1``,
``FREEFLOW_KERNELS=reference|triton`` or ``backend=`` to force). Each ``*_jvp`` op returns
``(out, out_tangent)``: ``out`` carries autograd, ``out_tangent`` is detached (tangents are
stop-gradient in FreeFlow's objectives). Tangent arguments may be ``None`` (zero); a returned tangent is
``None`` only when it is zero by structure (every input tangent it depends on was ``None``).
The Triton ops are autograd Functions with ``jvp`` rules (``torch.func``, ``forward_ad``) and, for
``torch.compile``, ``freeflow::`` torch.library custom ops (``_library``), which they call while compiling.
Dispatch internals (``_dispatch.check_backend``, ``_dispatch.use_triton``, the settings cache) stay private.

Modules, one op family each: ``flash_attention`` (JVP flash attention), ``adaln`` (modulate, gated
residual and the fused seam), ``gelu`` (bias + GELU), ``tangent_ops`` (LayerNorm, linear, SiLU, timestep
embedding: tangents without a kernel), ``block`` (the DiT block's fused schedule, which ``freeflow.models``
and ``patch`` run), ``patch`` (``patch_dit``); ``aot`` (compile report and gate) and
``selftest`` (GPU self-test) are command-line tools. No exported name equals a module name.

This package depends on torch (and triton when present) only; it never imports the rest of freeflow.
"""
from .adaln import (
    adaln_modulate,
    adaln_modulate_jvp,
    gated_residual,
    gated_residual_jvp,
    gated_residual_modulate,
    gated_residual_modulate_jvp,
)
from .flash_attention import attention, attention_jvp
from .gelu import bias_gelu, bias_gelu_jvp, gelu_tanh, gelu_tanh_jvp
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
    # attention
    "attention", "attention_jvp",
    # adaLN family
    "adaln_modulate", "adaln_modulate_jvp", "gated_residual", "gated_residual_jvp",
    "gated_residual_modulate", "gated_residual_modulate_jvp",
    # bias + GELU
    "bias_gelu", "bias_gelu_jvp", "gelu_tanh", "gelu_tanh_jvp",
    # tangent-only ops
    "layer_norm", "layer_norm_jvp", "linear", "linear_jvp", "silu", "silu_jvp",
    "timestep_embedding", "timestep_embedding_jvp",
    # model patching
    "patch_dit",
]

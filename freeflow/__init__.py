"""FreeFlow: data-free flow map distillation of flow-matching transformers.

Layers (each imports only the ones before it): ``freeflow.kernels`` → ``freeflow.models`` →
``freeflow.distill`` → ``freeflow.train`` / ``freeflow.sample``.
"""
__version__ = "0.1.0"

"""Experiments that test the paper's claims on the bundled problems: ``python -m freeflow.experiments NAME``.

    convergence   FD of the one-step student against step (10,000 steps) next to the teacher's 1/2/4/32-step FD
    ablation      prediction only / correction only / both, k ∈ {0, 1}, correction guidance [0, 0.7] vs [0, 1]
    mismatch      data-based (MeanFlow-form) distillation on augmented digits against data-free distillation
    teacher       a longer-trained demo teacher and its FD table
    gmm           the 2-D mixture: error to the exact endpoint against step, next to the teacher's Euler steps

Each writes ``NAME.json`` and ``NAME.png`` under ``--out`` (default ``docs/experiments``); runs and their
checkpoints live under ``--runs`` (default ``runs/experiments``), so a killed experiment resumes.
docs/experiments.md reports the committed results.
"""

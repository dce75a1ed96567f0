"""The lab: experiments that test the paper's claims on the bundled problems (``python -m freeflow.experiments NAME``).

Not part of the library: the wheel leaves this package and its ``assets/`` out (pyproject.toml), so it runs from a
source checkout (``pip install -e .``), and nothing in ``freeflow`` imports it. ``assets/mnist_teacher.pt`` is
the first demo teacher (3,600 steps), which only the studies distil; the demo ships the longer one.

    convergence   FD of the one-step student against step (10,000 steps) next to the teacher's 1/2/4/32-step FD
    ablation      prediction only / correction only / both, k ∈ {0, 1}, correction guidance [0, 0.7] vs [0, 1]
    mismatch      data-based (MeanFlow-form) distillation on augmented digits against data-free distillation
    teacher       a longer-trained demo teacher and its FD table
    gmm           the 2-D mixture: error to the exact endpoint against step, next to the teacher's Euler steps
    probes        the demo preset with one change each, over seeds: what holds the student above its teacher
    scaling       the demo preset at a large batch for a wall-time budget (a GPU's): FD against prior samples seen

Each writes ``NAME.json`` and ``NAME.png`` under ``--out`` and its training runs and their checkpoints under
``--runs`` (both required: an experiment writes only where it is told), so a killed experiment resumes.
docs/experiments.md reports the committed results (``--out docs/experiments --runs runs/experiments``).
"""

"""``python -m freeflow.experiments NAME [options]``: see ``freeflow/experiments/__init__.py``."""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

NAMES = ("convergence", "ablation", "mismatch", "teacher", "gmm", "probes", "scaling")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m freeflow.experiments",
                                description="Reproduce the paper's claims on the bundled problems "
                                            "(docs/experiments.md).")
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for name in NAMES:
        module = importlib.import_module(f".{name}", __package__)
        q = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--out", required=True, help="results folder (docs/experiments for the committed results)")
        q.add_argument("--runs", required=True, help="training runs folder (checkpoints; e.g. runs/experiments)")
        q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
        module.add_arguments(q)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        importlib.import_module(f".{args.name}", __package__).run(args)
    except ValueError as e:
        print(f"python -m freeflow.experiments {args.name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU self-test: every kernel against its reference at DiT-B/2 and DiT-XL/2 shapes, with timings.

    python -m freeflow.kernels.selftest            # exit 0: all within tolerance; 1: a mismatch; 2: no CUDA
    python -m freeflow.kernels.selftest --json selftest.json    # the same table as JSON too

For DiT-B/2 (hidden 768, 12 heads of 64) and DiT-XL/2 (hidden 1152, 16 heads of 72), 256 tokens, in bf16
and fp32, each Triton op (primal, fused tangent, backward) is compared with its PyTorch reference computed
in fp32: normwise relative error max|a - b| / max|b| against 2e-2 (bf16) and 1e-4 (fp32). GPU times are
``triton.testing.do_bench`` medians, against SDPA for the attention primal and against the eager reference
for everything else. Works with Triton 3.2 and later (it uses only the ops and ``do_bench``).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
MODELS = {"DiT-B/2": (768, 12), "DiT-XL/2": (1152, 16)}


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    scale = b.abs().max().item()
    return ((a - b).abs().max() / (scale if scale > 0 else 1.0)).item()


def _ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _cases(hidden, heads, dtype, batch, tokens):
    """(op, check) pairs; a check returns [(what, error, triton_ms, baseline_name, baseline_ms)]."""
    from . import adaln, flash_attention, gelu
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=dev)).to(dtype)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    def grads(outs, ins, gouts):
        return torch.autograd.grad(outs, ins, gouts)

    D = hidden // heads

    def attention():
        q, k, v, tq, tk, tv, do = (rnd(batch, heads, tokens, D) for _ in range(7))
        mine, ref = leaves(q, k, v), leaves(q, k, v)
        o = flash_attention.AttentionFunction.apply(*mine, None)[0]
        o_ref = flash_attention.attention_reference(*ref)
        rows = [("O", rel_err(o, o_ref))]
        rows += [(f"d{n}", rel_err(a, b)) for n, a, b in zip("qkv", grads(o, mine, do), grads(o_ref, ref, do))]
        o2, to = flash_attention.attention_jvp(q, k, v, tq, tk, tv)
        o2_ref, to_ref = flash_attention.attention_jvp_reference(q, k, v, tq, tk, tv)
        rows += [("jvp O", rel_err(o2, o2_ref)), ("jvp Ȯ", rel_err(to, to_ref))]
        qs = leaves(q, k, v)
        primal = lambda: torch.autograd.backward(flash_attention.AttentionFunction.apply(*qs, None)[0], do)  # noqa: E731
        sdpa = lambda: torch.autograd.backward(torch.nn.functional.scaled_dot_product_attention(*qs), do)  # noqa: E731
        jvp = lambda: flash_attention.attention_jvp(q, k, v, tq, tk, tv)  # noqa: E731
        jvp_ref = lambda: flash_attention.attention_jvp_reference(q, k, v, tq, tk, tv)  # noqa: E731
        times = [("fwd+bwd", _ms(primal), "SDPA", _ms(sdpa)), ("jvp", _ms(jvp), "eager", _ms(jvp_ref))]
        return rows, times

    def modulate_seam():
        x, h = rnd(batch, tokens, hidden), rnd(batch, tokens, hidden)
        gate, shift, scale = (rnd(batch, hidden, scale=0.5) for _ in range(3))
        tans = [rnd(batch, tokens, hidden), rnd(batch, hidden), rnd(batch, tokens, hidden),
                rnd(batch, hidden), rnd(batch, hidden)]
        prim = (x, gate, h, shift, scale)
        out = adaln.gated_residual_modulate_jvp(*prim, *tans)
        out_ref = adaln.gated_residual_modulate_jvp_reference(*prim, *tans)
        rows = [(n, rel_err(a, b)) for n, a, b in zip(("x'", "y", "ẋ'", "ẏ"), out, out_ref)]
        mine, ref = leaves(*prim), leaves(*prim)
        gx, gy = rnd(batch, tokens, hidden), rnd(batch, tokens, hidden)
        got = grads(adaln.gated_residual_modulate(*mine), mine, (gx, gy))
        want = grads(adaln.gated_residual_modulate_reference(*ref), ref, (gx, gy))
        rows += [(n, rel_err(a, b)) for n, a, b in zip(("dx", "dgate", "dh", "dshift", "dscale"), got, want)]
        y, ty = adaln.adaln_modulate_jvp(x, shift, scale, tans[0], tans[3], tans[4])
        y_ref, ty_ref = adaln.adaln_modulate_jvp_reference(x, shift, scale, tans[0], tans[3], tans[4])
        rows += [("modulate y", rel_err(y, y_ref)), ("modulate ẏ", rel_err(ty, ty_ref))]
        times = [("seam jvp", _ms(lambda: adaln.gated_residual_modulate_jvp(*prim, *tans)), "eager",
                  _ms(lambda: adaln.gated_residual_modulate_jvp_reference(*prim, *tans)))]
        return rows, times

    def bias_gelu():
        h, th, dy = (rnd(batch * tokens, 4 * hidden, scale=2.0) for _ in range(3))
        b = rnd(4 * hidden)
        y, ty = gelu.bias_gelu_jvp(h, b, th)
        y_ref, ty_ref = gelu.bias_gelu_jvp_reference(h, b, th)
        mine, ref = leaves(h, b), leaves(h, b)
        got = grads(gelu.bias_gelu(*mine), mine, dy)
        want = grads(gelu.bias_gelu_reference(*ref), ref, dy)
        rows = [("y", rel_err(y, y_ref)), ("ẏ", rel_err(ty, ty_ref)), ("dh", rel_err(got[0], want[0])),
                ("dbias", rel_err(got[1], want[1]))]
        times = [("jvp", _ms(lambda: gelu.bias_gelu_jvp(h, b, th)), "eager",
                  _ms(lambda: gelu.bias_gelu_jvp_reference(h, b, th)))]
        return rows, times

    return [("attention", attention), ("adaLN seam", modulate_seam), ("bias-GELU", bias_gelu)]


def _write_json(path, report) -> None:
    """The report so far (rewritten after every row, so a run stopped halfway leaves what it measured)."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m freeflow.kernels.selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write every row (errors per output, timings) to this JSON file")
    args = p.parse_args(argv)
    report = {"status": "running", "batch": args.batch, "tokens": args.tokens, "torch": torch.__version__,
              "rows": [], "failed": 0}
    if not torch.cuda.is_available():
        print("freeflow.kernels.selftest: no CUDA device visible; the self-test runs the compiled kernels on a GPU "
              "(the CPU test-suite proves them in the Triton interpreter).")
        report["status"] = "no_cuda"
        _write_json(args.json, report)
        return 2
    import triton
    report.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    print(f"freeflow.kernels self-test on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; batch {args.batch}, {args.tokens} tokens")
    head = f"{'model':<9} {'dtype':<5} {'op':<11} {'worst error (of)':<28} {'tol':>6} {'ok':<4} timings (ms)"
    print(head + "\n" + "-" * len(head))
    failed = 0
    for model, (hidden, heads) in MODELS.items():
        for dtype in (torch.bfloat16, torch.float32):
            for op, check in _cases(hidden, heads, dtype, args.batch, args.tokens):
                row = {"model": model, "dtype": str(dtype)[6:], "op": op, "tol": TOL[dtype]}
                try:
                    rows, times = check()
                except Exception as e:  # a kernel that fails to compile or launch is a failure too
                    print(f"{model:<9} {str(dtype)[6:]:<5} {op:<11} ERROR {type(e).__name__}: {e}"[:200])
                    failed += 1
                    report["rows"].append({**row, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
                    report["failed"] = failed
                    _write_json(args.json, report)
                    continue
                what, err = max(rows, key=lambda r: r[1])
                ok = all(e <= TOL[dtype] for _, e in rows)
                failed += not ok
                t = "; ".join(f"{w} {ms:.3f} vs {base} {bms:.3f} ({bms / ms:.1f}×)" for w, ms, base, bms in times)
                print(f"{model:<9} {str(dtype)[6:]:<5} {op:<11} {f'{err:.1e} ({what})':<28} {TOL[dtype]:>6.0e} "
                      f"{'yes' if ok else 'NO':<4} {t}")
                report["rows"].append({
                    **row, "ok": ok, "worst": {"what": what, "error": err}, "errors": dict(rows),
                    "times": [{"what": w, "ms": ms, "baseline": base, "baseline_ms": bms, "speedup": bms / ms}
                              for w, ms, base, bms in times]})
                report["failed"] = failed
                _write_json(args.json, report)
    print(f"\n{'FAIL: ' + str(failed) + ' op(s) outside tolerance' if failed else 'all kernels within tolerance'}")
    report.update(failed=failed, status="fail" if failed else "ok")
    _write_json(args.json, report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

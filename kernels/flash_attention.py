"""Scaled dot-product attention with a forward tangent (the JVP flash attention's reference).

    s = scale·Q Kᵀ,  P = softmax(s),  O = P V                      q, k, v: (B, H, S, Dh)
    ṡ = scale·(Q̇ Kᵀ + Q K̇ᵀ),   Ṗ = P ⊙ (ṡ - rowsum(P ⊙ ṡ))
    Ȯ = Ṗ V + P V̇ = Σ_j p_j ṡ_j v_j - (Σ_j p_j ṡ_j)·O + Σ_j p_j v̇_j

The reference materialises P (B·H·S² values) and computes in fp32 for fp16/bf16 inputs. It is
written with plain tensor ops so autograd and forward-mode AD (``torch.func.jvp``) go through it;
SDPA's CPU kernels have no forward-AD formula.

Kernel design (JVP flash attention). One forward kernel family; the constexpr flags ``HAS_TQ``,
``HAS_TK``, ``HAS_TV`` turn the tangent on term by term. A program owns BLOCK_M queries of one
(batch, head) and streams BLOCK_N keys at a time with the online softmax in base 2 (log2(e) folded
into the scale, ``exp2``), keeping besides the usual running max m, l = Σ e^{s-m} and Σ e^{s-m} v
the three tangent accumulators of docs/design.md §4 — μ = Σ e^{s-m} ṡ, Σ e^{s-m} ṡ v and Σ e^{s-m} v̇ — all
rescaled by the same factor. At the end O = acc/l and Ȯ = Σṡv/l - (μ/l)·O + Σv̇/l; the row
log-sum-exp (log2 units) is stored for the Triton and flash-attn backwards. P is never materialised: ~3×
the primal FLOPs for (O, Ȯ) in one pass.
A head dim that is not a power of two is padded to one and masked, or, in the configs whose
``SPLIT_QK`` / ``SPLIT_V`` allow it (``_configs``), runs as two power-of-two column chunks
(``head_chunks``: DiT-XL's 72 as 64 + 16, not one tile of 128): every head-dim product is then one
``tl.dot`` per chunk accumulated into the same tile and every head-dim accumulator one tile per chunk,
80 columns instead of 128. Any sequence length works by masking keys (s = -inf) and query rows.
Products run on the tensor cores in fp16/bf16 with fp32 accumulation; fp32 inputs take the precision
of ``FREEFLOW_FP32_DOT`` (default three-pass TF32); in the interpreter everything is fp32 (IEEE).
The backward is for the primal only (tangents are stop-gradient) and is chosen when the forward runs
(``backward_impl``, ``FREEFLOW_ATTENTION_BWD``): on CUDA by default SDPA's own backward, after recomputing O
with SDPA from the saved q, k, v (``sdpa_backward``: O and LSE are then not saved); optionally flash-attn 2.x's
backward kernel fed our O and LSE (``flash_attn_backward``, guarded: an unknown signature, an exception or
first gradients that differ from SDPA's fall back to SDPA with a warning); or ours, the default in the
interpreter: a preprocess kernel forms Δ = rowsum(dO ⊙ O), one kernel owns a key block (dK, dV) and one a
query block (dQ), so nothing needs atomics. Autotune configs target A100/H100 (``_FWD_CONFIGS``: the compile
report's clean tiles up to 128×64, with and without the head-dim split where both compile clean; the pruning
estimate ``_fwd_footprint`` is calibrated on that report); the interpreter runs the first. Autograd:
``AttentionFunction`` (its ``jvp`` rule launches the tangent variant, so ``torch.func.jvp`` / ``forward_ad``
work) and ``AttentionJVPFunction`` (O and Ȯ in one launch). While tracing (``torch.compile``, ``make_fx``) the public
ops call the custom ops ``freeflow::attention`` / ``freeflow::attention_jvp`` instead (``_library``: Dynamo cannot
trace a Function with ``jvp``); they run the same launch wrappers and the same backwards.

Dispatch (``attention``, ``attention_jvp``; docs/kernels.md, "Dispatch"): the reference off the Triton path;
with no tangent on CUDA, SDPA (``primal_impl``); with a tangent, the JVP kernel or the reference as
``tangent_impl`` decides from GPU timings — the kernel is never picked where it was measured slower than the
eager reference (fp32 on CUDA: the reference). ``FREEFLOW_ATTENTION``, ``FREEFLOW_ATTENTION_BWD`` and
``FREEFLOW_ATTENTION_JVP`` are read once (``settings``; ``refresh_settings`` re-reads, ``use_settings``
overrides for a block).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings

import torch
import torch.nn.functional as F

from ._dispatch import autocast_inputs, check_backend, use_triton
from ._launch import (
    LOG2E,
    apply,
    dot_settings,
    interpreting,
    kernel_rule,
    next_power_of_2,
    saved,
    smem_budget,
    tl,
    triton,
)
from ._library import absent, autograd_inside_op, define_op, forward_ad_active, input_grads, use_library_op
from ._validate import accumulation_dtype, check_tangents, check_tensor, detached


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=4)
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k must have shape ({b}, {h}, S_k, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape ({b}, {h}, {k.shape[2]}, Dv) to match k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")


def default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _probs(q, k, scale):
    acc = accumulation_dtype(q)
    return torch.softmax(scale * (q.to(acc) @ k.to(acc).transpose(-1, -2)), dim=-1)


def attention_reference(q, k, v, scale=None):
    _check(q, k, v)
    scale = default_scale(q, scale)
    p = _probs(q, k, scale)
    return (p @ v.to(p.dtype)).to(q.dtype)


def attention_jvp_reference(q, k, v, tq, tk, tv, scale=None):
    """(O, Ȯ): O differentiable w.r.t. q, k, v; Ȯ detached. Any tangent may be None (zero)."""
    _check(q, k, v)
    check_tangents([("tq", tq, q), ("tk", tk, k), ("tv", tv, v)])
    scale = default_scale(q, scale)
    p = _probs(q, k, scale)
    o = p @ v.to(p.dtype)
    if tq is None and tk is None and tv is None:
        return o.to(q.dtype), None
    with torch.no_grad():
        acc, pd = p.dtype, p.detach()
        to = torch.zeros_like(o)
        if tq is not None or tk is not None:
            ds = torch.zeros_like(pd)
            if tq is not None:
                ds += tq.to(acc) @ k.detach().to(acc).transpose(-1, -2)
            if tk is not None:
                ds += q.detach().to(acc) @ tk.to(acc).transpose(-1, -2)
            ds *= scale
            dp = pd * (ds - (pd * ds).sum(-1, keepdim=True))
            to += dp @ v.detach().to(acc)
        if tv is not None:
            to += pd @ tv.to(acc)
    return o.to(q.dtype), to.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

def _configs(pairs, rows="BLOCK_M", split_qk_always=False):
    """Autotune configs for A100/H100; the interpreter runs the first only (no GPU to time on).

    Each entry is (BLOCK_M, BLOCK_N, num_warps, num_stages) and optionally the head dims the config keeps
    padded to a power of two ("qk", "v" or "qkv") where the rule below would split them.

    ``SPLIT_QK`` / ``SPLIT_V``: whether a head dim that allows it (72 → 64 + 16) runs as two chunks with this
    config, q/k's and v's. An output chunk 16 wide makes Triton's Ampere MMA layout put every warp along the
    rows, which replicates the work of a block with fewer than 16 rows per warp (16×32, 4 warps: 2.5× the MMA
    instructions, 832 B spilled against 16 B in fp32). So a head dim that is a product's output (v's in the
    forward, both in the backward) splits only where the warps tile the ``rows`` of the owned block 16 rows
    each (the usual flash layout); q/k's head dim is only ever summed over in the forward, so it can always
    split there (``split_qk_always``). Which layout is faster is for the GPU to time: where the compile report
    shows both clean, both variants are listed."""
    def config(m, n, w, st, padded=""):
        tiled = (m, n)[rows == "BLOCK_N"] >= 16 * w
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n,
                              "SPLIT_QK": (tiled or split_qk_always) and "qk" not in padded,
                              "SPLIT_V": tiled and "v" not in padded}, num_warps=w, num_stages=st)
    configs = [config(*p) for p in pairs]
    return configs[:1] if interpreting() else configs


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, padded]). The first is the interpreter's: it runs every shape. The
# tangent variants keep a second [BLOCK_M, BLOCK_DV] fp32 accumulator and ṡ next to s; pruning keeps per flag set
# only the configs whose estimated registers and shared memory fit (``_pruner``), the compile report checks it
# (docs/kernels.md, "Forward configs"). The largest clean tangent tiles: 128×64 with 8 warps at head dim 64 (both
# archs); 128×32 and 128×16 with 8 warps at 72 on sm_90; 64×16 with 4 warps and q/k padded at 72 on both.
_FWD_TILES = [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3),
              (128, 32, 8, 3), (128, 16, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 3, "qkv"), (64, 16, 4, 3),
              (64, 16, 4, 3, "qk"), (32, 64, 4, 3), (32, 32, 4, 2), (32, 32, 4, 2, "qk"), (64, 32, 8, 1),
              (32, 32, 8, 2), (32, 64, 8, 2), (16, 32, 4, 2), (64, 16, 8, 2)]
_FWD_CONFIGS = _configs(_FWD_TILES, split_qk_always=True)
_DKDV_CONFIGS = _configs([(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2),
                          (32, 64, 8, 2), (32, 32, 4, 2)], rows="BLOCK_N")
_DQ_CONFIGS = _configs([(64, 64, 4, 2), (32, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3),
                        (32, 32, 4, 2)])
_BWD_KEY = ["S_q", "S_k", "HEAD_D", "HEAD_D2", "HEAD_DV", "HEAD_DV2", "UPCAST", "PRECISION"]
_FWD_KEY = _BWD_KEY + ["HAS_TQ", "HAS_TK", "HAS_TV"]
# Estimated live values per thread (``_fwd_footprint``/``_bwd_footprint``) above which a config is pruned.
# Calibrated on the compile report (python -m freeflow.kernels.aot --all-configs, Triton 3.9; docs/kernels.md,
# "Forward configs"): bf16 head dims 64 and 72, every forward config, 7 flag sets, sm_80 and sm_90. The tangent
# budget keeps every config clean on both archs at head dim 64 (up to 128×64 with 8 warps, estimate 400) and
# prunes the ones that spill kilobytes on sm_80 at 72 (128×64, 64×64 with 4 warps, 64×32 padded, BLOCK_N = 128);
# the primal budget keeps all but the two BLOCK_N = 128 configs that spill at 72.
_REG_BUDGET = {"fwd": 480, "fwd_tangent": 400, "bwd": 176}


def _chunks(head, tail, split):
    """(first, second) column chunk of a head dim padded to ``head`` whose ``head_chunks`` tail is ``tail``:
    half the padded width and the tail where there is one and the config splits, else (head, 0)."""
    return (head // 2, tail) if split and tail else (head, 0)


# The chunk widths every attention kernel tiles its head dims with, as constexprs derived per launch from
# the head-dim flags and the config's split flags (a @triton.jit helper cannot return a constexpr that
# sizes tl.zeros). A second chunk of 0 means the head dim runs unsplit.
_head_chunk_widths = triton.heuristics({
    "BLOCK_D": lambda a: _chunks(a["HEAD_D"], a["HEAD_D2"], a["SPLIT_QK"])[0],
    "BLOCK_D2": lambda a: _chunks(a["HEAD_D"], a["HEAD_D2"], a["SPLIT_QK"])[1],
    "BLOCK_DV": lambda a: _chunks(a["HEAD_DV"], a["HEAD_DV2"], a["SPLIT_V"])[0],
    "BLOCK_DV2": lambda a: _chunks(a["HEAD_DV"], a["HEAD_DV2"], a["SPLIT_V"])[1],
})


def _widths(config, meta):
    """(q/k head-dim columns, v head-dim columns, bytes per operand) a launch computes with under a config."""
    d = sum(_chunks(meta["HEAD_D"], meta["HEAD_D2"], config.kwargs["SPLIT_QK"]))
    dv = sum(_chunks(meta["HEAD_DV"], meta["HEAD_DV2"], config.kwargs["SPLIT_V"]))
    return d, dv, 4 if meta["UPCAST"] else 2


def _fwd_footprint(config, meta):
    """(registers per thread, shared memory bytes) a forward config needs, estimated from its tiles."""
    M, N = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    D, DV, es = _widths(config, meta)
    threads = 32 * config.num_warps
    tangent_s = meta["HAS_TQ"] or meta["HAS_TK"]
    tangent = tangent_s or meta["HAS_TV"]
    accumulators = (1 + tangent) * M * DV                        # Σ e^{s-m} v, Σ e^{s-m}(ṡ v + v̇)
    operands = (1 + meta["HAS_TQ"]) * M * D * es / 4             # q, q̇ stay in registers
    tiles = (2 + 2 * tangent_s) * M * N                          # s, p (+ ṡ, p·ṡ)
    # k and v enter the products as register tiles that every warp holds whole (the warps split the rows of s,
    # not its columns): a per-thread cost that more warps do not share
    b_operands = N * (D + DV) * es / 4 / 32
    # what lives across the whole key loop (accumulators, q, q̇) weighs more than the tiles of one step, which the
    # compiler can schedule around: Dh=72 with 128 padded columns spills kilobytes on sm_80 where Dh=64 at the
    # same per-step size is clean
    regs = (1.5 * (accumulators + operands) + tiles) / threads + b_operands
    streamed = N * (D + DV + meta["HAS_TK"] * D + meta["HAS_TV"] * DV) * es
    smem = max(config.num_stages - 1, 1) * streamed + M * N * es * (1 + tangent_s)
    return regs, smem


def _bwd_footprint(config, meta, owner):
    """Same for the backward kernels; ``owner`` is "kv" (dK, dV per key block) or "q" (dQ per query block)."""
    M, N = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    D, DV, es = _widths(config, meta)
    threads = 32 * config.num_warps
    if owner == "kv":
        held = N * (D + DV) * (1 + es / 4)                       # dK, dV accumulators; K, V operands
        streamed = M * (D + DV) * es
    else:
        held = M * D * (1 + es / 4) + M * DV * es / 4            # dQ accumulator; Q, dO operands
        streamed = N * (D + DV) * es
    regs = (held + 3 * M * N) / threads                          # s/p, dp, ds
    smem = max(config.num_stages - 1, 1) * streamed + 2 * M * N * es
    return regs, smem


def _pruner(footprint, kind):
    """``early_config_prune`` keeping the configs whose estimated registers and shared memory fit.

    Never empty: if nothing fits, the config with the smallest register estimate stays (and the compile
    report fails the launch case)."""
    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        sized, seen = [], set()
        for c in configs:
            # split flags change nothing where the head dims have no second chunk (64, 128): one of each such set
            same = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, _widths(c, meta))
            if same not in seen:
                seen.add(same)
                sized.append((c, *footprint(c, meta)))
        tangent = kind == "fwd" and (meta["HAS_TQ"] or meta["HAS_TK"] or meta["HAS_TV"])
        budget = _REG_BUDGET["fwd_tangent" if tangent else kind]
        kept = [c for c, regs, smem in sized if regs <= budget and smem <= smem_budget()]
        return kept or [min(sized, key=lambda t: t[1])[0]]
    return prune


@triton.jit
def _load_tile(ptr, rows, row_ok, stride_s, stride_d, D, FIRST: tl.constexpr, BLOCK: tl.constexpr,
               UPCAST: tl.constexpr):
    """Rows × head-dim columns [FIRST, FIRST + BLOCK) of one (batch, head), zero past S and D."""
    cols = FIRST + tl.arange(0, BLOCK)
    t = tl.load(ptr + rows[:, None] * stride_s + cols[None, :] * stride_d,
                mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_head(ptr, rows, row_ok, stride_s, stride_d, D, BLOCK: tl.constexpr, BLOCK2: tl.constexpr,
               UPCAST: tl.constexpr):
    """The head dim as two tiles, columns [0, BLOCK) and [BLOCK, BLOCK + BLOCK2); without a second
    chunk (BLOCK2 = 0) the second is the first, and the callers never read it."""
    main = _load_tile(ptr, rows, row_ok, stride_s, stride_d, D, 0, BLOCK, UPCAST)
    tail = main
    if BLOCK2 > 0:
        tail = _load_tile(ptr, rows, row_ok, stride_s, stride_d, D, BLOCK, BLOCK2, UPCAST)
    return main, tail


@triton.jit
def _store_tile(ptr, x, rows, row_ok, D, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """Store x into columns [FIRST, FIRST + BLOCK) of contiguous rows of width D."""
    cols = FIRST + tl.arange(0, BLOCK)
    tl.store(ptr + rows[:, None] * D + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _dot_nt(a, a2, b, b2, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """[a | a2] · [b | b2]ᵀ (+ acc): a product over the head dim, chunk by chunk."""
    out = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if SPLIT:
        out = tl.dot(a2, tl.trans(b2), out, input_precision=PRECISION)
    return out


@triton.autotune(configs=_FWD_CONFIGS, key=_FWD_KEY,
                 prune_configs_by={"early_config_prune": _pruner(_fwd_footprint, "fwd")})
@_head_chunk_widths
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV,         # (B, H, S, D|Dv) inputs and tangents, any strides
    Out, TOut, LSE,              # O, Ȯ: contiguous (B, H, S_q, Dv); LSE: (B, H, S_q) fp32, log2 units
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_tqb, stride_tqh, stride_tqs, stride_tqd,
    stride_tkb, stride_tkh, stride_tks, stride_tkd,
    stride_tvb, stride_tvh, stride_tvs, stride_tvd,
    H, S_q, S_k, D, Dv,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, STORE_O: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_QK: tl.constexpr, SPLIT_V: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr, HEAD_DV2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < S_q
    TANGENT_S: tl.constexpr = HAS_TQ or HAS_TK
    TANGENT: tl.constexpr = TANGENT_S or HAS_TV
    q, q2 = _load_head(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qs, stride_qd, D,
                       BLOCK_D, BLOCK_D2, UPCAST)
    if HAS_TQ:
        tq, tq2 = _load_head(TQ + b * stride_tqb + h * stride_tqh, rows, row_ok, stride_tqs, stride_tqd, D,
                             BLOCK_D, BLOCK_D2, UPCAST)
    qk_scale = sm_scale * LOG2E  # log2(e) folded in: the softmax runs on exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of s (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # Σ e^{s - m}
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)      # Σ e^{s - m} v, head-dim chunk by chunk
    if BLOCK_DV2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], dtype=tl.float32)
    if TANGENT:
        # Σ e^{s-m} ṡ v and Σ e^{s-m} v̇ share their rescale: one accumulator holds their sum
        acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        if BLOCK_DV2 > 0:
            acc_t2 = tl.zeros([BLOCK_M, BLOCK_DV2], dtype=tl.float32)
    if TANGENT_S:
        mu = tl.zeros([BLOCK_M], dtype=tl.float32)             # Σ e^{s - m} ṡ
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start_n in range(0, S_k, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S_k
        k, k2 = _load_head(k_base, cols, col_ok, stride_ks, stride_kd, D, BLOCK_D, BLOCK_D2, UPCAST)
        v, v2 = _load_head(v_base, cols, col_ok, stride_vs, stride_vd, Dv, BLOCK_DV, BLOCK_DV2, UPCAST)
        s = _dot_nt(q, q2, k, k2, None, BLOCK_D2 > 0, PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        if BLOCK_DV2 > 0:
            acc2 = tl.dot(p.to(v.dtype), v2, acc2 * alpha[:, None], input_precision=PRECISION)
        if TANGENT:
            acc_t = acc_t * alpha[:, None]
            if BLOCK_DV2 > 0:
                acc_t2 = acc_t2 * alpha[:, None]
        if TANGENT_S:
            if HAS_TK:
                tk, tk2 = _load_head(TK + b * stride_tkb + h * stride_tkh, cols, col_ok, stride_tks, stride_tkd, D,
                                     BLOCK_D, BLOCK_D2, UPCAST)
            if HAS_TQ:
                s_dot = _dot_nt(tq, tq2, k, k2, None, BLOCK_D2 > 0, PRECISION)
                if HAS_TK:
                    s_dot = _dot_nt(q, q2, tk, tk2, s_dot, BLOCK_D2 > 0, PRECISION)
            else:
                s_dot = _dot_nt(q, q2, tk, tk2, None, BLOCK_D2 > 0, PRECISION)
            p_sdot = p * (s_dot * sm_scale)  # ṡ in natural units, as in the formula for Ȯ
            mu = mu * alpha + tl.sum(p_sdot, axis=1)
            acc_t = tl.dot(p_sdot.to(v.dtype), v, acc_t, input_precision=PRECISION)
            if BLOCK_DV2 > 0:
                acc_t2 = tl.dot(p_sdot.to(v.dtype), v2, acc_t2, input_precision=PRECISION)
        if HAS_TV:
            tv, tv2 = _load_head(TV + b * stride_tvb + h * stride_tvh, cols, col_ok, stride_tvs, stride_tvd, Dv,
                                 BLOCK_DV, BLOCK_DV2, UPCAST)
            acc_t = tl.dot(p.to(tv.dtype), tv, acc_t, input_precision=PRECISION)
            if BLOCK_DV2 > 0:
                acc_t2 = tl.dot(p.to(tv.dtype), tv2, acc_t2, input_precision=PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    o = acc * inv_l[:, None]
    if BLOCK_DV2 > 0:
        o2 = acc2 * inv_l[:, None]
    out = bh * S_q * Dv
    if STORE_O:
        _store_tile(Out + out, o, rows, row_ok, Dv, 0, BLOCK_DV)
        if BLOCK_DV2 > 0:
            _store_tile(Out + out, o2, rows, row_ok, Dv, BLOCK_DV, BLOCK_DV2)
        tl.store(LSE + bh * S_q + rows, m_i + tl.log2(l_i), mask=row_ok)
    if TANGENT:
        o_dot = acc_t * inv_l[:, None]
        if TANGENT_S:
            o_dot -= (mu * inv_l)[:, None] * o
        _store_tile(TOut + out, o_dot, rows, row_ok, Dv, 0, BLOCK_DV)
        if BLOCK_DV2 > 0:
            o_dot2 = acc_t2 * inv_l[:, None]
            if TANGENT_S:
                o_dot2 -= (mu * inv_l)[:, None] * o2
            _store_tile(TOut + out, o_dot2, rows, row_ok, Dv, BLOCK_DV, BLOCK_DV2)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Delta,               # Delta = rowsum(dO ⊙ O), fp32 (B, H, S_q)
    stride_dob, stride_doh, stride_dos, stride_dod,
    H, S_q, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows < S_q)[:, None] & (offs_dv < Dv)[None, :]
    o = tl.load(Out + bh * S_q * Dv + rows[:, None] * Dv + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_dv[None, :] * stride_dod,
                 mask=mask, other=0.0)
    tl.store(Delta + bh * S_q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=rows < S_q)


@triton.autotune(configs=_DKDV_CONFIGS, key=_BWD_KEY,
                 prune_configs_by={"early_config_prune": _pruner(lambda c, m: _bwd_footprint(c, m, "kv"), "bwd")})
@_head_chunk_widths
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta,     # saved inputs, incoming dO (any strides), saved LSE, Delta
    DK, DV,                      # contiguous like K, V
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    H, S_q, S_k, D, Dv,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_QK: tl.constexpr, SPLIT_V: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr, HEAD_DV2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
):
    """One program owns BLOCK_N keys and loops over all queries: dV = Pᵀ dO, dK = scale·dSᵀ Q."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    col_ok = cols < S_k
    k, k2 = _load_head(K + b * stride_kb + h * stride_kh, cols, col_ok, stride_ks, stride_kd, D,
                       BLOCK_D, BLOCK_D2, UPCAST)
    v, v2 = _load_head(V + b * stride_vb + h * stride_vh, cols, col_ok, stride_vs, stride_vd, Dv,
                       BLOCK_DV, BLOCK_DV2, UPCAST)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if BLOCK_D2 > 0:
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    if BLOCK_DV2 > 0:
        dv2 = tl.zeros([BLOCK_N, BLOCK_DV2], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    for start_m in range(0, S_q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < S_q
        q, q2 = _load_head(q_base, rows, row_ok, stride_qs, stride_qd, D, BLOCK_D, BLOCK_D2, UPCAST)
        do, do2 = _load_head(do_base, rows, row_ok, stride_dos, stride_dod, Dv, BLOCK_DV, BLOCK_DV2, UPCAST)
        lse = tl.load(LSE + bh * S_q + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + bh * S_q + rows, mask=row_ok, other=0.0)
        s = _dot_nt(q, q2, k, k2, None, BLOCK_D2 > 0, PRECISION) * qk_scale
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        p_t = tl.trans(p).to(do.dtype)
        dv = tl.dot(p_t, do, dv, input_precision=PRECISION)
        if BLOCK_DV2 > 0:
            dv2 = tl.dot(p_t, do2, dv2, input_precision=PRECISION)
        dp = _dot_nt(do, do2, v, v2, None, BLOCK_DV2 > 0, PRECISION)
        ds_t = tl.trans(p * (dp - delta[:, None])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dk2 = tl.dot(ds_t, q2, dk2, input_precision=PRECISION)
    _store_tile(DK + bh * S_k * D, dk * sm_scale, cols, col_ok, D, 0, BLOCK_D)
    _store_tile(DV + bh * S_k * Dv, dv, cols, col_ok, Dv, 0, BLOCK_DV)
    if BLOCK_D2 > 0:
        _store_tile(DK + bh * S_k * D, dk2 * sm_scale, cols, col_ok, D, BLOCK_D, BLOCK_D2)
    if BLOCK_DV2 > 0:
        _store_tile(DV + bh * S_k * Dv, dv2, cols, col_ok, Dv, BLOCK_DV, BLOCK_DV2)


@triton.autotune(configs=_DQ_CONFIGS, key=_BWD_KEY,
                 prune_configs_by={"early_config_prune": _pruner(lambda c, m: _bwd_footprint(c, m, "q"), "bwd")})
@_head_chunk_widths
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta,
    DQ,                          # contiguous like Q
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    H, S_q, S_k, D, Dv,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_QK: tl.constexpr, SPLIT_V: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr, HEAD_DV2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
):
    """One program owns BLOCK_M queries and loops over all keys: dQ = scale·dS K (no atomics)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < S_q
    q, q2 = _load_head(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qs, stride_qd, D,
                       BLOCK_D, BLOCK_D2, UPCAST)
    do, do2 = _load_head(DO + b * stride_dob + h * stride_doh, rows, row_ok, stride_dos, stride_dod, Dv,
                         BLOCK_DV, BLOCK_DV2, UPCAST)
    lse = tl.load(LSE + bh * S_q + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * S_q + rows, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start_n in range(0, S_k, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S_k
        k, k2 = _load_head(k_base, cols, col_ok, stride_ks, stride_kd, D, BLOCK_D, BLOCK_D2, UPCAST)
        v, v2 = _load_head(v_base, cols, col_ok, stride_vs, stride_vd, Dv, BLOCK_DV, BLOCK_DV2, UPCAST)
        s = _dot_nt(q, q2, k, k2, None, BLOCK_D2 > 0, PRECISION) * qk_scale
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot_nt(do, do2, v, v2, None, BLOCK_DV2 > 0, PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dq2 = tl.dot(ds, k2, dq2, input_precision=PRECISION)
    _store_tile(DQ + bh * S_q * D, dq * sm_scale, rows, row_ok, D, 0, BLOCK_D)
    if BLOCK_D2 > 0:
        _store_tile(DQ + bh * S_q * D, dq2 * sm_scale, rows, row_ok, D, BLOCK_D, BLOCK_D2)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------


def _strides(t):
    return t.stride() if t is not None else (0, 0, 0, 0)


def head_chunks(d: int) -> tuple[int, int]:
    """The head dim d as one or two power-of-two tiles (≥ 16 each for ``tl.dot``), masked past d.

    One tile of next_power_of_2(d) unless two are narrower: 72 → 64 + 16 (80 columns, not 128),
    96 → 64 + 32, 48 → 32 + 16; 64, 100 (→ 128) and 200 (→ 256) stay one tile. The second chunk's
    size is 0 when there is none."""
    whole = max(16, next_power_of_2(d))
    main = whole // 2
    tail = max(16, next_power_of_2(d - main)) if d > main else 0
    return (main, tail) if tail and main + tail < whole else (whole, 0)


@functools.cache  # 1.9 µs a call uncached, more than the custom-op check the public ops make (bench_overhead)
def _head_blocks(D, Dv):
    """Launch flags: each head dim's padded width and, where it splits, its second chunk (0 if it does not);
    a config's ``SPLIT_QK`` / ``SPLIT_V`` pick between the two (the first chunk is half the padded width).
    Shared between calls: callers unpack it, never change it."""
    return dict(HEAD_D=max(16, next_power_of_2(D)), HEAD_D2=head_chunks(D)[1],
                HEAD_DV=max(16, next_power_of_2(Dv)), HEAD_DV2=head_chunks(Dv)[1])


def attention_forward(q, k, v, tq=None, tk=None, tv=None, scale=None, *, store_o=True):
    """Launch the (JVP) flash forward. Returns (O or None, Ȯ or None, LSE or None); LSE in log2 units."""
    B, H, S_q, D = q.shape
    S_k, Dv = k.shape[2], v.shape[3]
    scale = default_scale(q, scale)
    tangent = tq is not None or tk is not None or tv is not None
    o = torch.empty((B, H, S_q, Dv), device=q.device, dtype=q.dtype) if store_o else None
    lse = torch.empty((B, H, S_q), device=q.device, dtype=torch.float32) if store_o else None
    to = torch.empty((B, H, S_q, Dv), device=q.device, dtype=q.dtype) if tangent else None
    UPCAST, PRECISION = dot_settings(q.dtype)
    _attn_fwd_kernel[lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)](
        q, k, v, tq, tk, tv, o, to, lse, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(tq), *_strides(tk), *_strides(tv),
        H, S_q, S_k, D, Dv,
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, STORE_O=store_o,
        UPCAST=UPCAST, PRECISION=PRECISION, **_head_blocks(D, Dv),
    )
    return o, to, lse


def attention_backward(do, q, k, v, o, lse, scale):
    """(dQ, dK, dV) of O = softmax(scale·QKᵀ)V from the saved O and LSE (flash backward, no P stored)."""
    B, H, S_q, D = q.shape
    S_k, Dv = k.shape[2], v.shape[3]
    UPCAST, PRECISION = dot_settings(q.dtype)
    delta = torch.empty((B, H, S_q), device=q.device, dtype=torch.float32)
    BLOCK_M = max(16, min(64, next_power_of_2(S_q)))
    _attn_bwd_preprocess_kernel[(triton.cdiv(S_q, BLOCK_M), B * H)](
        o, do, delta, *_strides(do), H, S_q, Dv, BLOCK_M=BLOCK_M, BLOCK_DV=max(16, next_power_of_2(Dv)))
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), H, S_q, S_k, D, Dv)
    flags = dict(UPCAST=UPCAST, PRECISION=PRECISION, **_head_blocks(D, Dv))
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(S_k, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, scale, *args, **flags)
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, scale, *args, **flags)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Settings: which implementation runs where (read from the environment once, not per call)
# ----------------------------------------------------------------------------------------------

PRIMAL_IMPLS = ("sdpa", "flash_attn", "triton")
BACKWARD_IMPLS = ("sdpa", "flash_attn", "triton")
TANGENT_IMPLS = ("auto", "triton")
# setting: (environment variable, its values, the value when unset; None = by device, see backward_impl)
_ENV = {"primal": ("FREEFLOW_ATTENTION", PRIMAL_IMPLS, "sdpa"),
        "backward": ("FREEFLOW_ATTENTION_BWD", BACKWARD_IMPLS, None),
        "tangent": ("FREEFLOW_ATTENTION_JVP", TANGENT_IMPLS, "auto")}
_SETTINGS: dict = {}


def _choice(key: str, value):
    name, choices, default = _ENV[key]
    value = (value or "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def settings() -> dict:
    """{"primal", "backward", "tangent"}: ``FREEFLOW_ATTENTION``, ``FREEFLOW_ATTENTION_BWD`` and
    ``FREEFLOW_ATTENTION_JVP``, read on first use and cached — dispatch runs on every attention call, and these
    are process settings. ``refresh_settings()`` reads them again; ``use_settings`` overrides them for a block."""
    if not _SETTINGS:
        _SETTINGS.update({key: _choice(key, os.environ.get(spec[0])) for key, spec in _ENV.items()})
    return _SETTINGS


def refresh_settings() -> dict:
    """Read the environment again (after changing it in a running process, e.g. in tests) and forget what was
    learnt about flash-attn (importable, its signature, its first backward checked against SDPA's)."""
    _SETTINGS.clear()
    _flash_attn_func.cache_clear()
    _flash_attn_backward_op.cache_clear()
    _FLASH_BWD.update(checked=False, off=None)
    return settings()


@contextlib.contextmanager
def use_settings(*, primal=None, backward=None, tangent=None):
    """Within the block attention dispatches as if the environment variables said so (None: unchanged). The backward
    that runs is fixed when the forward runs, so a forward inside the block keeps its choice for its backward."""
    new = {key: _choice(key, value) for key, value in
           (("primal", primal), ("backward", backward), ("tangent", tangent)) if value is not None}
    old = dict(settings())
    _SETTINGS.update(new)
    try:
        yield _SETTINGS
    finally:
        _SETTINGS.clear()
        _SETTINGS.update(old)


# ----------------------------------------------------------------------------------------------
# The backward: SDPA recompute (default on CUDA), flash-attn's kernel, or the Triton kernels
# ----------------------------------------------------------------------------------------------


def backward_impl(q, v) -> str:
    """The backward an attention Function's forward on q, v commits to (it decides what is saved): ``sdpa``,
    ``flash_attn`` or ``triton``.

    ``FREEFLOW_ATTENTION_BWD`` unset: ``sdpa`` on CUDA (H100, DiT-XL/2 bf16: SDPA forward + backward 0.284 ms
    against 0.712 ms for the Triton forward + backward, of which 0.118 ms forward), ``triton`` elsewhere (the
    interpreter: what tests the Triton backward). Set, it applies on every device; ``flash_attn`` runs only
    where flash-attn takes the inputs (CUDA, fp16/bf16, equal head dims, a multiple of 8, ≤ 256) and is
    importable with a known signature, else ``sdpa`` (with a one-time warning when it is the import or the
    signature that fails)."""
    choice = settings()["backward"]
    if choice is None:
        return "sdpa" if _on_cuda(q) else "triton"
    if choice == "flash_attn" and not (_on_cuda(q) and _flash_attn_takes(q, v) and _flash_backward_usable()):
        return "sdpa"
    return choice


# Dynamo calls it rather than tracing it (it imports flash-attn and reads a signature: graph breaks); what it
# answers is a fact of the process, and a compiled graph keeps the backward it was traced with.
@torch.compiler.assume_constant_result
def _flash_backward_usable() -> bool:
    """flash-attn's backward has not been turned off in this process and is importable with a signature this module
    knows (if not, it is turned off now, with its warning)."""
    if _FLASH_BWD["off"]:
        return False
    op, why = _flash_attn_backward_op()
    if op is None:
        _flash_backward_off(why)
    return op is not None


def sdpa_backward(do, q, k, v, scale, needs=(True, True, True)):
    """(dQ, dK, dV) of O = softmax(scale·QKᵀ)V by recomputing O with SDPA under autograd and running SDPA's own
    backward (flash or memory-efficient on CUDA, its CPU kernels elsewhere): q, k and v are all it needs. A
    gradient whose ``needs`` entry is False is None."""
    leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), needs)]
    # autocast off: q, k, v already are what the forward computed with (autocast_inputs cast them)
    with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
        o = F.scaled_dot_product_attention(*leaves, scale=scale)
    grads = iter(torch.autograd.grad(o, [t for t in leaves if t.requires_grad], do))
    return tuple(next(grads) if need else None for need in needs)


# flash-attn 2.x's ``_flash_attn_backward`` is called by keyword: the arguments we pass, and the fixed values of the
# ones that changed across 2.x (``window_size`` became ``window_size_left``/``_right`` and ``softcap`` came in 2.6).
_FLASH_BWD_PASSED = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "softmax_scale")
_FLASH_BWD_FIXED = dict(dropout_p=0.0, causal=False, window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
# checked: its first gradients matched SDPA's; off: why it is not used in this process (None: it may be)
_FLASH_BWD: dict = dict(checked=False, off=None)
LN2 = 0.6931471805599453


@functools.cache
def _flash_attn_backward_op():
    """(flash-attn's ``_flash_attn_backward``, the fixed keyword arguments it takes) or (None, why it is unusable).

    A signature this module does not know (a required parameter it would not pass, or one of its own missing)
    makes it unusable rather than guessed at."""
    try:
        from flash_attn.flash_attn_interface import _flash_attn_backward as op
    except Exception as e:  # not installed, or built for another torch/CUDA
        return None, f"flash-attn's _flash_attn_backward cannot be imported ({type(e).__name__}: {e})"
    try:  # from 2.6 on it is a torch.library custom op, which keeps the Python function as _init_fn
        params = inspect.signature(getattr(op, "_init_fn", op)).parameters
    except (TypeError, ValueError) as e:
        return None, f"the signature of flash-attn's _flash_attn_backward cannot be read ({e})"
    missing = [n for n in _FLASH_BWD_PASSED if n not in params]
    unknown = [n for n, p in params.items() if n not in _FLASH_BWD_PASSED and n not in _FLASH_BWD_FIXED
               and (p.default is p.empty or p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY))]
    if missing or unknown:
        return None, (f"flash-attn's _flash_attn_backward({', '.join(params)}) is not a 2.x signature this module "
                      f"knows (missing {missing}, unknown required {unknown})")
    return op, {n: v for n, v in _FLASH_BWD_FIXED.items() if n in params}


def _flash_backward_off(why: str):
    if _FLASH_BWD["off"] is None:
        _FLASH_BWD["off"] = why
        warnings.warn(f"FREEFLOW_ATTENTION_BWD=flash_attn: {why}; the attention backward runs on SDPA instead "
                      "for the rest of this process", RuntimeWarning, stacklevel=3)


def flash_attn_backward(do, q, k, v, o, lse, scale):
    """(dQ, dK, dV) by flash-attn 2.x's backward kernel from our forward's O and LSE: flash-attn takes
    (B, S, H, D) tensors (ours transposed, no copy) and the log-sum-exp in natural-log units, (B, H, S) fp32
    (ours is log2 units: × ln 2). The gradients come back as (B, H, S, D) views of (B, S, H, D) storage."""
    op, fixed = _flash_attn_backward_op()
    if op is None:
        raise RuntimeError(fixed)

    def bshd(t):
        return t.transpose(1, 2)

    dq, dk, dv = (torch.empty(bshd(t).shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    op(dout=bshd(do), q=bshd(q), k=bshd(k), v=bshd(v), out=bshd(o), softmax_lse=lse * LN2, dq=dq, dk=dk, dv=dv,
       softmax_scale=scale, **fixed)
    return bshd(dq), bshd(dk), bshd(dv)


def _flash_or_sdpa_backward(do, q, k, v, o, lse, scale):
    """flash-attn's backward, guarded: if it raises, or its first gradients in this process differ from SDPA's
    (one extra backward, once), a warning says so and SDPA's backward runs from then on — never wrong gradients."""
    if _FLASH_BWD["off"] is None:
        try:
            grads = flash_attn_backward(do, q, k, v, o, lse, scale)
        except Exception as e:
            _flash_backward_off(f"its backward raised {type(e).__name__}: {str(e)[:200]}")
        else:
            if _FLASH_BWD["checked"]:
                return grads
            want = sdpa_backward(do, q, k, v, scale)
            err = max(_rel_err(a, b) for a, b in zip(grads, want))
            if err <= _FLASH_CHECK_TOL:
                _FLASH_BWD["checked"] = True
                return grads
            _flash_backward_off(f"its gradients differ from SDPA's by {err:.1e} (normwise relative) on the first call")
            return want
    return sdpa_backward(do, q, k, v, scale)


# Two correct fp16/bf16 backwards agree to ~1e-3 normwise; wrong LSE units or layouts give O(1) differences.
_FLASH_CHECK_TOL = 2e-2


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    scale = b.abs().max().item()
    return ((a - b).abs().max() / (scale if scale > 0 else 1.0)).item()


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------


def _save_for_backward(ctx, impl, q, k, v, o, lse):
    """Save what the chosen backward ``impl`` reads: q, k, v for the SDPA recompute (O and LSE are then freed with the
    caller's last reference: at DiT-XL/2, B = 32, bf16, 18.5 MiB per attention layer), also O and LSE otherwise."""
    ctx.backward_impl = impl
    if impl == "sdpa":
        ctx.save_for_backward(q, k, v)
    else:
        ctx.save_for_backward(q, k, v, o, lse)


class AttentionFunction(torch.autograd.Function):
    """(O, LSE); ``jvp`` runs the tangent variant of the forward kernel (Ȯ only, O not rewritten)."""

    @staticmethod
    def forward(q, k, v, scale):
        o, _, lse = attention_forward(q, k, v, scale=scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.scale = default_scale(q, scale)
        _save_for_backward(ctx, backward_impl(q, v), q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # LSE gets no gradient: no zero-fill launch for it

    @staticmethod
    @kernel_rule
    def backward(ctx, do, _dlse):
        return _backward(ctx, do) + (None,)

    @staticmethod
    @kernel_rule
    def jvp(ctx, tq, tk, tv, _tscale):
        q, k, v = saved(ctx)  # in a jvp rule: what save_for_forward saved
        _, to, _ = attention_forward(q, k, v, tq, tk, tv, ctx.scale, store_o=False)
        return (torch.zeros_like(q[..., :1]).expand(*q.shape[:3], v.shape[3]) if to is None else to), None


class AttentionJVPFunction(torch.autograd.Function):
    """(O, Ȯ, LSE) in one launch; Ȯ and LSE are non-differentiable outputs."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, scale):
        return attention_forward(q, k, v, tq, tk, tv, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale = inputs
        o, to, lse = output
        ctx.scale = default_scale(q, scale)
        _save_for_backward(ctx, backward_impl(q, v), q, k, v, o, lse)
        ctx.mark_non_differentiable(to, lse)
        ctx.set_materialize_grads(False)  # Ȯ and LSE get no gradient: no zero-fill launches for them

    @staticmethod
    @kernel_rule
    def backward(ctx, do, _dto, _dlse):
        return _backward(ctx, do) + (None,) * 4


def _backward(ctx, do):
    if do is None:
        return (None,) * 3
    needs = ctx.needs_input_grad[:3]
    if ctx.backward_impl == "sdpa":
        return sdpa_backward(do, *saved(ctx), ctx.scale, needs)
    q, k, v, o, lse = saved(ctx)
    if ctx.backward_impl == "flash_attn":
        grads = _flash_or_sdpa_backward(do, q, k, v, o, lse, ctx.scale)
    else:
        grads = attention_backward(do, q, k, v, o, lse, ctx.scale)
    return tuple(g if need else None for g, need in zip(grads, needs))


# ----------------------------------------------------------------------------------------------
# torch.library ops (``_library``): what torch.compile traces; the public ops call them while tracing.
# The backward the forward commits to (``backward_impl``) is an argument of the forward ops, read when the public op
# is traced: it is in the captured graph, so a cached compiled artifact cannot serve another choice. The SDPA
# recompute is plain torch ops, traced into the backward graph; the Triton and flash-attn backwards are ops.
# ----------------------------------------------------------------------------------------------


def _check_backward_choice(backward):
    if backward not in BACKWARD_IMPLS:
        raise ValueError(f"backward must be one of {BACKWARD_IMPLS}, got {backward!r}")


def _out_fake(q, v):
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _lse_fake(q):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_impl(q, k, v, scale, backward):
    _check_backward_choice(backward)
    o, _, lse = attention_forward(q, k, v, scale=scale)
    return o, lse


def _attention_fake(q, k, v, scale, backward):
    _check_backward_choice(backward)
    return _out_fake(q, v), _lse_fake(q)


def _attention_jvp_impl(q, k, v, tq, tk, tv, scale, backward):
    _check_backward_choice(backward)
    o, to, lse = attention_forward(q, k, v, tq, tk, tv, scale)
    return o, absent(q) if to is None else to, lse


def _attention_jvp_fake(q, k, v, tq, tk, tv, scale, backward):
    _check_backward_choice(backward)
    tangent = tq is not None or tk is not None or tv is not None
    return _out_fake(q, v), _out_fake(q, v) if tangent else absent(q), _lse_fake(q)


def _attention_setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    scale, backward = inputs[-2:]
    ctx.scale = default_scale(q, scale)
    _save_for_backward(ctx, backward, q, k, v, output[0], output[-1])
    ctx.mark_non_differentiable(*output[1:])  # LSE and (jvp op) Ȯ
    ctx.set_materialize_grads(False)  # as in the Functions: no zero-fill launches for outputs without gradient


def _attention_grads(ctx, do, *_):
    if do is None:
        return input_grads(ctx)
    if ctx.backward_impl == "sdpa":
        return input_grads(ctx, *sdpa_backward(do, *ctx.saved_tensors, ctx.scale, ctx.needs_input_grad[:3]))
    op = _flash_backward_op if ctx.backward_impl == "flash_attn" else _backward_op
    return input_grads(ctx, *op(do, *ctx.saved_tensors, ctx.scale))


def _backward_impl(do, q, k, v, o, lse, scale):
    return attention_backward(do, q, k, v, o, lse, scale)


def _backward_fake(do, q, k, v, o, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _bshd_empty(t):
    """A (B, H, S, D) tensor over (B, S, H, D) storage: the layout flash-attn writes its gradients in."""
    return t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2)


def _flash_backward_impl(do, q, k, v, o, lse, scale):
    with autograd_inside_op():  # the fallback (and the first call's check) recomputes O with SDPA under autograd
        grads = _flash_or_sdpa_backward(do, q, k, v, o, lse, scale)
    # an op's output layout is fixed (its fake): flash-attn's, so SDPA's gradients (the rare fallback) are copied
    return tuple(g if g.transpose(1, 2).is_contiguous() else _bshd_empty(g).copy_(g) for g in grads)


def _flash_backward_fake(do, q, k, v, o, lse, scale):
    return tuple(_bshd_empty(t) for t in (q, k, v))


_BACKWARD_SCHEMA = ("(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale) "
                    "-> (Tensor, Tensor, Tensor)")
_backward_op = define_op("attention_backward", _BACKWARD_SCHEMA, _backward_impl, _backward_fake)
_flash_backward_op = define_op("attention_flash_attn_backward", _BACKWARD_SCHEMA, _flash_backward_impl,
                               _flash_backward_fake)
_attention_op = define_op(
    "attention", "(Tensor q, Tensor k, Tensor v, float? scale, str backward) -> (Tensor, Tensor)",
    _attention_impl, _attention_fake, backward=_attention_grads, setup_context=_attention_setup)
_attention_jvp_op = define_op(
    "attention_jvp", "(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, float? scale, str backward) "
    "-> (Tensor, Tensor, Tensor)",
    _attention_jvp_impl, _attention_jvp_fake, backward=_attention_grads, setup_context=_attention_setup)


def _check_triton(q, k, v, *tangents):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be float32, float16 or bfloat16 on the Triton path, got {q.dtype}")
    for name, t in (("k", k), ("v", v)) + tuple(zip(("tq", "tk", "tv"), tangents)):
        if t is not None and t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if max(q.shape[3], v.shape[3]) > 256:
        raise ValueError(f"head dims up to 256 are supported on the Triton path, got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k must have at least one token, got q {tuple(q.shape)}, k {tuple(k.shape)}")


# ----------------------------------------------------------------------------------------------
# Dispatch: the primal fast path (SDPA or flash-attn on CUDA when no tangent is needed) and the
# tangent rule (the JVP kernel only where it was measured faster than the eager reference)
# ----------------------------------------------------------------------------------------------

# (O, Ȯ) in one pass, GPU ms: (JVP kernel, attention_jvp_reference) per (dtype, head dim). H100 80GB, torch 2.11,
# Triton 3.6, batch 8, 256 tokens, do_bench medians (docs/kernels.md, "Measured on an H100": the self-test).
TANGENT_TIMINGS_H100 = {
    (torch.bfloat16, 64): (0.356, 0.661),
    (torch.bfloat16, 72): (0.313, 0.698),
    (torch.float32, 64): (0.635, 0.386),
    (torch.float32, 72): (15.695, 0.588),
}


def tangent_impl(dtype: torch.dtype, head_dim: int, device_type: str, backend: str = "auto") -> str:
    """Where attention with a tangent runs once Triton can: ``"triton"`` (the JVP kernel) or ``"reference"``
    (``attention_jvp_reference``; ``attention`` under forward AD: ``attention_reference``).

    DESIGN §8: dispatch never picks a kernel measured slower than the path it replaces. On CUDA the kernel runs
    where it was measured faster than the eager reference for this dtype, at the nearest measured head dim
    (``TANGENT_TIMINGS_H100``; H100, batch 8, S = 256):

        dtype  head dim  JVP kernel   eager reference
        bf16   64         0.356 ms     0.661 ms      → kernel (1.9× faster)
        bf16   72         0.313 ms     0.698 ms      → kernel (2.2× faster)
        fp32   64         0.635 ms     0.386 ms      → reference (kernel 1.6× slower)
        fp32   72        15.695 ms     0.588 ms      → reference (kernel 27× slower)

    fp16 runs bf16's tensor-core code and follows bf16. Only S = 256 was measured: the rule does not look at S.
    Off CUDA (the Triton interpreter) the kernel runs: that is where the tests prove it. ``backend="triton"``
    (or ``FREEFLOW_KERNELS=triton``) and ``FREEFLOW_ATTENTION_JVP=triton`` force the kernel."""
    if backend == "triton" or device_type != "cuda" or settings()["tangent"] == "triton":
        return "triton"
    family = torch.bfloat16 if dtype == torch.float16 else dtype
    measured = [(abs(d - head_dim), ms) for (dt, d), ms in TANGENT_TIMINGS_H100.items() if dt == family]
    if not measured:
        return "triton"
    kernel_ms, eager_ms = min(measured)[1]
    return "triton" if kernel_ms < eager_ms else "reference"


def _on_cuda(t) -> bool:
    return t.device.type == "cuda"


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


def _flash_attn_takes(q, v) -> bool:
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1]
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def primal_impl(q, k, v, backend=None) -> str:
    """What ``attention(q, k, v)`` runs: "reference", "triton" (the JVP kernel) or, with no tangent, "sdpa" or
    "flash_attn".

    Rule: the reference off the Triton path (``use_triton``); off CUDA (the interpreter) the JVP kernel; on CUDA,
    when a tangent may be needed, the JVP kernel or the reference as ``tangent_impl`` says (fp32 → reference);
    with no tangent, SDPA's flash/efficient backends (they take head dim 72 as is) — or flash-attn when
    ``FREEFLOW_ATTENTION=flash_attn`` and it is installed and takes these inputs, the JVP kernel with
    ``FREEFLOW_ATTENTION=triton``.
    """
    backend = check_backend(backend)
    if not use_triton(q, k, v, backend=backend):
        return "reference"
    if not _on_cuda(q):
        return "triton"
    if forward_ad_active(q, k, v):
        return tangent_impl(q.dtype, q.shape[-1], "cuda", backend)
    choice = settings()["primal"]
    if choice == "flash_attn":
        return "flash_attn" if _flash_attn_takes(q, v) and _flash_attn_func() is not None else "sdpa"
    return choice


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _flash_attn(q, k, v, scale):
    o = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return o.transpose(1, 2)


def attention(q, k, v, scale=None, *, backend=None):
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` (no mask, no dropout).

    Under autocast q, k and v are cast to the autocast dtype first, as SDPA does (so fp32 q/k from an
    fp32 LayerNorm meet a bf16 v)."""
    _check(q, k, v)
    q, k, v = autocast_inputs(q.device, q, k, v)
    impl = primal_impl(q, k, v, backend)
    if impl == "reference":
        return attention_reference(q, k, v, scale)
    _check_triton(q, k, v)
    if impl == "sdpa":
        return _sdpa(q, k, v, default_scale(q, scale))
    if impl == "flash_attn":
        return _flash_attn(q, k, v, default_scale(q, scale))
    if use_library_op():
        return _attention_op(q, k, v, scale, backward_impl(q, v))[0]
    return apply(AttentionFunction, q, k, v, scale)[0]


def attention_jvp(q, k, v, tq, tk, tv, scale=None, *, backend=None):
    """One pass computing (O, Ȯ); ``o`` differentiable w.r.t. q, k, v, ``o_tangent`` detached.

    Under autocast the inputs and tangents are cast to the autocast dtype first, as in ``attention``. With a
    tangent, ``tangent_impl`` decides between the fused kernel and the reference (fp32 on CUDA: the reference)."""
    _check(q, k, v)
    check_tangents([("tq", tq, q), ("tk", tk, k), ("tv", tv, v)])
    q, k, v, tq, tk, tv = autocast_inputs(q.device, q, k, v, tq, tk, tv)
    backend = check_backend(backend)
    if not use_triton(q, k, v, tq, tk, tv, backend=backend):
        return attention_jvp_reference(q, k, v, tq, tk, tv, scale)
    _check_triton(q, k, v, tq, tk, tv)
    if tq is None and tk is None and tv is None:
        return attention(q, k, v, scale, backend=backend), None
    if tangent_impl(q.dtype, q.shape[-1], "cuda" if _on_cuda(q) else q.device.type, backend) == "reference":
        return attention_jvp_reference(q, k, v, tq, tk, tv, scale)
    if use_library_op():
        o, to, _ = _attention_jvp_op(q, k, v, tq, tk, tv, scale, backward_impl(q, v))
        return o, to
    # _launch.apply: Function.apply's per-call signature binding cost 25 µs of 40 here (launches stubbed, CPU)
    o, to, _ = apply(AttentionJVPFunction, q, k, v, detached(tq), detached(tk), detached(tv), scale)
    return o, to

"""Flash-attention forward (online softmax, O(T) memory) that steers and records heads.

One program handles BLOCK_M queries of one (batch, query head) and streams the keys of its kv
head (GQA: never expanded). Each extra is a constexpr switch, so the plain path compiles to
the plain kernel:

* HAS_SCALE    z_h ← scale[h] · z_h (the runtime steering tensor, query-head level)
* HAS_READOUT  readout[b, t, h, :] = z_h · u_h for K directions u [H, d, K] (DLA in the epilogue)
* HAS_MASS     mass[b, t, h, s] = Σ_{j ∈ span s} p_tj for key spans [start, end) — retrieval /
               lookback / sink scores without the T×S matrix; accumulated like the output
               (rescaled whenever the running max moves), divided by the row sum at the end
* WRITE_LSE    log-sum-exp per row (natural log, −inf for a row with no visible key)
* WRITE_O      z itself (off when only readouts or statistics are wanted)

Causal masking is aligned bottom-right (query t sees keys j ≤ t + S − T), which is the
KV-cache convention; for T == S it is the usual lower triangle. A boolean key mask [b, S]
(True = attend) covers padding. Softmax runs in base 2 with fp32 statistics and accumulation
whatever the input dtype.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from attnfx.errors import ShapeMismatchError

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _visible(offs_m, offs_n, T, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
             CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """[M, N] keys each query row may attend: in range, causal (bottom-right), not masked out."""
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_KEY_MASK:
        keep = tl.load(KEY_MASK + b * stride_mb + offs_n * stride_ms, mask=offs_n < S, other=0)
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def _block(H, T, D, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program over (row block, batch·head) works on: b, h, its kv head, the block's row
    and head-dim offsets and their in-range masks (rows: queries, or keys in the dK/dV pass)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_m, pid_bh, b, h, h // GROUP, offs_m, offs_d, offs_m < T, offs_d < D


@triton.jit
def _last_key(S, pid_m, causal_offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key a query block can see (causal blocks stop at their diagonal)."""
    end = S
    if CAUSAL:
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M + causal_offset)
    return end


@triton.jit
def _attention_fwd(
    Q, K, V, O, LSE, KEY_MASK, HEAD_SCALE, U, READOUT, SPANS, MASS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_ms,
    stride_uh, stride_ud, stride_uk,
    H, T, S, D, GROUP, NUM_DIRS, NUM_SPANS, causal_offset, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_READOUT: tl.constexpr, HAS_MASS: tl.constexpr, WRITE_O: tl.constexpr, WRITE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_bh, b, h, kv, offs_m, offs_d, row_ok, d_ok = _block(H, T, D, GROUP, BLOCK_M, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_MASS:
        offs_s = tl.arange(0, BLOCK_S)
        span_lo = tl.load(SPANS + offs_s * 2, mask=offs_s < NUM_SPANS, other=0)
        span_hi = tl.load(SPANS + offs_s * 2 + 1, mask=offs_s < NUM_SPANS, other=0)
        mass = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)

    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + b * stride_vb + kv * stride_vh
    end = _last_key(S, pid_m, causal_offset, BLOCK_M, CAUSAL)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale          # base-2 logits [M, N]
        visible = _visible(offs_m, offs_n, T, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
                           CAUSAL, HAS_KEY_MASK)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)         # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if HAS_MASS:
            in_span = (offs_n[:, None] >= span_lo[None, :]) & (offs_n[:, None] < span_hi[None, :])
            mass = mass * alpha[:, None] + tl.dot(p, in_span.to(tl.float32), input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0                                                 # the row saw some key
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    z = acc * inv_l[:, None]
    if HAS_SCALE:
        z = z * tl.load(HEAD_SCALE + h).to(tl.float32)

    row_t = b * T + offs_m                                           # row of [b·T] outputs
    if WRITE_O:
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 z.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + pid_bh * T + offs_m, lse, mask=row_ok)
    if HAS_READOUT:
        offs_k = tl.arange(0, BLOCK_K)
        u = tl.load(U + h * stride_uh + offs_d[:, None] * stride_ud + offs_k[None, :] * stride_uk,
                    mask=d_ok[:, None] & (offs_k[None, :] < NUM_DIRS), other=0.0).to(tl.float32)
        r = tl.dot(z, u, input_precision="ieee")                      # [M, K]
        tl.store(READOUT + (row_t[:, None] * H + h) * NUM_DIRS + offs_k[None, :], r,
                 mask=row_ok[:, None] & (offs_k[None, :] < NUM_DIRS))
    if HAS_MASS:
        frac = mass * inv_l[:, None]
        tl.store(MASS + (row_t[:, None] * H + h) * NUM_SPANS + offs_s[None, :], frac,
                 mask=row_ok[:, None] & (offs_s[None, :] < NUM_SPANS))


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _launcher(kernel, traceable: bool):
    """The kernel itself, or wrapped so that make_fx / AOT autograd trace it as a node Inductor
    compiles (torch.library.triton_op); wrapping costs ~1 ms per eager call, so only on request."""
    return wrap_triton(kernel) if traceable else kernel


def attention_fwd(q, k, v, *, causal: bool = False, key_mask=None, sm_scale: float | None = None,
                  head_scale=None, directions=None, spans=None, write_o: bool = True, write_lse: bool = True,
                  traceable: bool = False):
    """q [b, H, T, d], k/v [b, Hkv, S, d] (H a multiple of Hkv). Returns a dict with "o"
    [b, H, T, d] (input dtype), "lse" [b, H, T], "readout" [b, T, H, K], "mass" [b, T, H, n]
    (fp32), each present only when asked for. `directions` [H, d, K]; `spans` [n, 2] int
    (start, end) key ranges; `key_mask` [b, S] bool; `head_scale` [H]. traceable=True launches
    through torch.library.wrap_triton (inside a triton_op)."""
    b, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ShapeMismatchError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    dev, f32 = q.device, torch.float32
    out = {}
    o = q.new_empty(q.shape) if write_o else q.new_empty(1)               # contiguous whatever q is
    lse = torch.empty(b, H, T, device=dev, dtype=f32) if write_lse else q.new_empty(1, dtype=f32)
    num_dirs = 0 if directions is None else directions.shape[-1]
    readout = torch.empty(b, T, H, num_dirs, device=dev, dtype=f32) if num_dirs else q.new_empty(1, dtype=f32)
    num_spans = 0 if spans is None else spans.shape[0]
    spans_i = spans.to(device=dev, dtype=torch.int32).contiguous() if num_spans else q.new_zeros(2, dtype=torch.int32)
    mass = torch.empty(b, T, H, num_spans, device=dev, dtype=f32) if num_spans else q.new_empty(1, dtype=f32)
    mask_i = key_mask.to(device=dev, dtype=torch.int8) if key_mask is not None else q.new_zeros(1, 1, dtype=torch.int8)
    u = directions if num_dirs else q.new_zeros(1, 1, 1)
    scale = head_scale if head_scale is not None else q.new_ones(1)
    block_d = _pow2(D)
    block_m, block_n = (32, 32) if _INTERPRET else ((128, 64) if block_d <= 64 else (64, 64))
    if not _INTERPRET and block_d > 128:
        block_m, block_n = 64, 32
    grid = (triton.cdiv(T, block_m), b * H)
    _launcher(_attention_fwd, traceable)[grid](
        q, k, v, o, lse, mask_i, scale, u, readout, spans_i, mass,
        *q.stride(), *k.stride(), *v.stride(), *(o.stride() if write_o else (0, 0, 0, 0)),
        *(mask_i.stride() if key_mask is not None else (0, 0)),
        *(u.stride() if num_dirs else (0, 0, 0)),
        H, T, S, D, H // Hkv, num_dirs, num_spans, S - T, sm_scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=_pow2(max(num_dirs, 1)),
        BLOCK_S=_pow2(max(num_spans, 1)), CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
        HAS_SCALE=head_scale is not None, HAS_READOUT=num_dirs > 0, HAS_MASS=num_spans > 0,
        WRITE_O=write_o, WRITE_LSE=write_lse, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8, num_stages=1 if _INTERPRET else 3,
    )
    if write_o:
        out["o"] = o
    if write_lse:
        out["lse"] = lse
    if num_dirs:
        out["readout"] = readout
    if num_spans:
        out["mass"] = mass
    return out


# ---- backward ------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEY_MASK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_mb, stride_ms,
    H, HKV, T, S, D, GROUP, causal_offset, sm_scale, k_grad_scale, v_grad_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one kv head: sums over the queries of every head in its group.
    q/do/dq share strides (contiguous [b, H, T, d]); k/v/dk/dv share theirs ([b, Hkv, S, d])."""
    pid_n, _, b, kv, _, offs_n, offs_d, col_ok, d_ok = _block(HKV, S, D, 1, BLOCK_N, BLOCK_D)
    kv_off = b * stride_kb + kv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = 0
    if CAUSAL:
        first = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        h = kv * GROUP + g
        for start in range(first, T, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
            q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)        # rows that saw no key: p = 0
            delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            ok = _visible(offs_m, offs_n, T, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
                          CAUSAL, HAS_KEY_MASK)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)                # [M, N]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + kv_off, (dk * (sm_scale * k_grad_scale)).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + kv_off, (dv * v_grad_scale).to(DV.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_MASK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_mb, stride_ms,
    H, T, S, D, GROUP, causal_offset, sm_scale, q_grad_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query block of one head (a second pass: no atomics, deterministic)."""
    pid_m, pid_bh, b, h, kv, offs_m, offs_d, row_ok, d_ok = _block(H, T, D, GROUP, BLOCK_M, BLOCK_D)
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = _last_key(S, pid_m, causal_offset, BLOCK_M, CAUSAL)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        kv_off = b * stride_kb + kv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        k = tl.load(K + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        ok = _visible(offs_m, offs_n, T, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
                      CAUSAL, HAS_KEY_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_off, (dq * (sm_scale * q_grad_scale)).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# AttnLRP (DESIGN §3): uniform rule on QKᵀ and on AV → grad q, k × ¼ and grad v × ½.
LRP_GRAD_SCALES = {"q": 0.25, "k": 0.25, "v": 0.5}


def attention_bwd(do, q, k, v, o, lse, *, causal: bool = False, key_mask=None, sm_scale: float | None = None,
                  lrp: bool = False, delta=None, traceable: bool = False):
    """Gradients of o = softmax(q kᵀ · scale) v (o unscaled by any head scale; `do` the gradient
    at that o) → (dq, dk, dv, relevance), relevance [b, H, T] = Σ_d do ⊙ o per row (the rowsum
    the flash backward needs anyway; with lrp=True it is each head's AttnLRP relevance). lrp=True
    also scales dq, dk by ¼ and dv by ½. `delta` overrides the rowsum (a caller whose output was
    scaled after the kernel passes Σ grad ⊙ output, which is the same number)."""
    b, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    relevance = (do.float() * o.float()).sum(-1) if delta is None else delta.float().contiguous()   # [b, H, T]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_i = key_mask.to(device=q.device, dtype=torch.int8) if key_mask is not None else q.new_zeros(1, 1, dtype=torch.int8)
    mask_strides = mask_i.stride() if key_mask is not None else (0, 0)
    block_d = _pow2(D)
    block = 32 if _INTERPRET else (64 if block_d <= 64 else 32)
    scales = LRP_GRAD_SCALES if lrp else {"q": 1.0, "k": 1.0, "v": 1.0}
    common = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=4 if block_d <= 64 else 8, num_stages=1 if _INTERPRET else 2)
    lse = lse.contiguous()
    _launcher(_attention_bwd_dkdv, traceable)[(triton.cdiv(S, block), b * Hkv)](
        q, k, v, do, lse, relevance, dk, dv, mask_i, *q.stride(), *k.stride(), *mask_strides,
        H, Hkv, T, S, D, H // Hkv, S - T, sm_scale, scales["k"], scales["v"], **common)
    _launcher(_attention_bwd_dq, traceable)[(triton.cdiv(T, block), b * H)](
        q, k, v, do, lse, relevance, dq, mask_i, *q.stride(), *k.stride(), *mask_strides,
        H, T, S, D, H // Hkv, S - T, sm_scale, scales["q"], **common)
    return dq, dk, dv, relevance

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

Every loop over blocks runs in two parts: the blocks that every row of the program sees whole
(no bounds or causal mask, only the key mask) and the rest (the diagonal and the ragged end).
Rows past the end of the sequence are never masked: they load zeros and are never stored.
Absent extras are passed as None (no placeholder tensors); batch/head base offsets are int64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnfx.errors import ShapeMismatchError
from attnfx.kernels import launch

LOG2E = 1.4426950408889634


@triton.jit
def _visible(offs_m, offs_n, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
             BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """[M, N] (or [1, N]) keys each query row may attend: not masked out, and with BOUNDS in
    range and causal (bottom-right)."""
    if HAS_KEY_MASK:
        ok = tl.load(KEY_MASK + b * stride_mb + offs_n * stride_ms, mask=offs_n < S, other=0)[None, :] != 0
    else:
        ok = offs_n[None, :] < S
    if BOUNDS and CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return ok


@triton.jit
def _block(H, T, D, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program over (row block, batch·head) works on: b, h (int64), its kv head, the
    block's row and head-dim offsets and their in-range masks (rows: queries, or keys in the
    dK/dV pass). The grid is 1-D (x allows 2³¹ − 1 programs; y and z only 65,535), row blocks
    fastest, so the programs running together share one head's K/V in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = (pid // num_m).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_m, pid_bh, b, h, h // GROUP, offs_m, offs_d, offs_m < T, offs_d < D


@triton.jit
def _key_range(S, pid_m, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(whole, end): key blocks [0, whole) are visible to every row of query block pid_m and in
    range; [whole, end) need the mask; keys from end on are hidden from all its rows."""
    end = S
    last = S
    if CAUSAL:
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M + causal_offset)
        last = tl.maximum(tl.minimum(S, pid_m * BLOCK_M + causal_offset + 1), 0)   # first row's keys
    return last // BLOCK_N * BLOCK_N, end


@triton.jit
def _fwd_keys(acc, l_i, m_i, mass, q, k_base, v_base, lo, hi, offs_m, offs_d, d_ok, S, b, KEY_MASK, SPANS,
              stride_ks, stride_kd, stride_vs, stride_vd, stride_mb, stride_ms, NUM_SPANS, causal_offset, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_KEY_MASK: tl.constexpr, HAS_MASS: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (MASKED: bounds and causal mask applied)."""
    if HAS_MASS:
        offs_s = tl.arange(0, BLOCK_S)
        span_lo = tl.load(SPANS + offs_s * 2, mask=offs_s < NUM_SPANS, other=0)
        span_hi = tl.load(SPANS + offs_s * 2 + 1, mask=offs_s < NUM_SPANS, other=0)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale          # base-2 logits [M, N]
        if MASKED or HAS_KEY_MASK:
            visible = _visible(offs_m, offs_n, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
                               MASKED, CAUSAL, HAS_KEY_MASK)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)         # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        p_in = p.to(v.dtype)
        acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=PRECISION)
        if HAS_MASS:
            in_span = ((offs_n[:, None] >= span_lo[None, :]) & (offs_n[:, None] < span_hi[None, :])).to(v.dtype)
            mass = _span_mass(mass * alpha[:, None], p, p_in, in_span, PRECISION)
        m_i = m_new
    return acc, l_i, m_i, mass


@triton.jit
def _span_mass(mass, p, p_in, in_span, PRECISION: tl.constexpr):
    """mass + p · in_span on the tensor cores in the input dtype: the 0/1 indicator is exact, and
    p = hi + lo, both rounded to the input dtype, carries 2× its mantissa (bf16: p to 2⁻¹⁶), so
    the sum stays fp32-accurate where a single 16-bit p would be off by up to 2⁻⁹ of the mass.
    (An fp32 dot here was an FMA loop that spilled 500–570 B a thread at d 64 on sm_90.)"""
    if p_in.dtype == tl.float32:
        mass = tl.dot(p, in_span, mass, input_precision=PRECISION)
    else:
        mass = tl.dot(p_in, in_span, mass)
        mass = tl.dot((p - p_in.to(tl.float32)).to(p_in.dtype), in_span, mass)
    return mass


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
    PRECISION: tl.constexpr, READOUT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh, b, h, kv, offs_m, offs_d, row_ok, d_ok = _block(H, T, D, GROUP, BLOCK_M, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mass = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)                   # unused (and dropped) without spans
    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + b * stride_vb + kv * stride_vh
    whole, end = _key_range(S, pid_m, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i, mass = _fwd_keys(
        acc, l_i, m_i, mass, q, k_base, v_base, 0, whole, offs_m, offs_d, d_ok, S, b, KEY_MASK, SPANS,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_mb, stride_ms, NUM_SPANS, causal_offset, qk_scale,
        BLOCK_N, BLOCK_S, False, CAUSAL, HAS_KEY_MASK, HAS_MASS, PRECISION)
    acc, l_i, m_i, mass = _fwd_keys(
        acc, l_i, m_i, mass, q, k_base, v_base, whole, end, offs_m, offs_d, d_ok, S, b, KEY_MASK, SPANS,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_mb, stride_ms, NUM_SPANS, causal_offset, qk_scale,
        BLOCK_N, BLOCK_S, True, CAUSAL, HAS_KEY_MASK, HAS_MASS, PRECISION)

    seen = l_i > 0.0                                                 # the row saw some key
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    z = acc * inv_l[:, None]
    if HAS_SCALE:
        z = z * tl.load(HEAD_SCALE + h).to(tl.float32)

    row_t = b * T + offs_m                                           # row of [b·T] outputs (int64)
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
        # [M, K]; 16-bit inputs: three tf32 products (~fp32 accuracy) on the tensor cores, where
        # an fp32 FMA loop spilled 750 B a thread at d 128 (sm_90)
        r = tl.dot(z, u, input_precision=READOUT_PRECISION)
        tl.store(READOUT + (row_t[:, None] * H + h) * NUM_DIRS + offs_k[None, :], r,
                 mask=row_ok[:, None] & (offs_k[None, :] < NUM_DIRS))
    if HAS_MASS:
        offs_s = tl.arange(0, BLOCK_S)
        frac = mass * inv_l[:, None]
        tl.store(MASS + (row_t[:, None] * H + h) * NUM_SPANS + offs_s[None, :], frac,
                 mask=row_ok[:, None] & (offs_s[None, :] < NUM_SPANS))


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


_INT32_MAX = 2**31 - 1


def rows_fit_int32(shape, stride) -> bool:
    """Whether every element of one (batch, head) of a [b, h, t, d] tensor lies within int32 of
    its base: the kernels' base offsets are int64, their row offsets int32."""
    return (shape[2] - 1) * abs(stride[2]) + (shape[3] - 1) * abs(stride[3]) <= _INT32_MAX


def _addressable(x: torch.Tensor, name: str) -> torch.Tensor:
    """x read in place, or contiguous when its strides put one head's rows beyond int32 (a
    transposed view of a very long sequence); a head larger than that is refused."""
    if rows_fit_int32(x.shape, x.stride()):
        return x
    x = x.contiguous()
    if not rows_fit_int32(x.shape, x.stride()):
        raise ShapeMismatchError(f"{name}: one head holds {x.shape[2]} × {x.shape[3]} elements, more than the "
                                 f"2³¹ − 1 the kernels address within a head")
    return x


def attention_fwd(q, k, v, *, causal: bool = False, key_mask=None, sm_scale: float | None = None,
                  head_scale=None, directions=None, spans=None, write_o: bool = True, write_lse: bool = True,
                  traceable: bool = False):
    """q [b, H, T, d], k/v [b, Hkv, S, d] (H a multiple of Hkv; any strides). Returns a dict with
    "o" [b, H, T, d] (input dtype, contiguous), "lse" [b, H, T], "readout" [b, T, H, K], "mass"
    [b, T, H, n] (fp32), each present only when asked for. `directions` [H, d, K]; `spans` [n, 2]
    int (start, end) key ranges; `key_mask` [b, S] bool; `head_scale` [H]. traceable=True
    launches through torch.library.wrap_triton (inside a triton_op)."""
    q, k, v = _addressable(q, "q"), _addressable(k, "k"), _addressable(v, "v")
    b, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ShapeMismatchError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    dev, f32 = q.device, torch.float32
    num_dirs = 0 if directions is None else directions.shape[-1]
    num_spans = 0 if spans is None else spans.shape[0]
    out = {}
    if write_o:
        out["o"] = q.new_empty(q.shape)                                    # contiguous whatever q is
    if write_lse:
        out["lse"] = torch.empty(b, H, T, device=dev, dtype=f32)
    if num_dirs:
        out["readout"] = torch.empty(b, T, H, num_dirs, device=dev, dtype=f32)
    if num_spans:
        out["mass"] = torch.empty(b, T, H, num_spans, device=dev, dtype=f32)
    spans_i = spans.to(device=dev, dtype=torch.int32).contiguous() if num_spans else None
    mask_i = key_mask.to(device=dev, dtype=torch.int8) if key_mask is not None else None
    block_d = _pow2(D)
    launch.launch(
        _attention_fwd, launch.forward_candidates(block_d, q.dtype, num_spans > 0),
        lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * b * H,), traceable,
        q, k, v, out.get("o"), out.get("lse"), mask_i, head_scale, directions if num_dirs else None,
        out.get("readout"), spans_i, out.get("mass"),
        *q.stride(), *k.stride(), *v.stride(), *(out["o"].stride() if write_o else (0, 0, 0, 0)),
        *(mask_i.stride() if mask_i is not None else (0, 0)),
        *(directions.stride() if num_dirs else (0, 0, 0)),
        H, T, S, D, H // Hkv, num_dirs, num_spans, S - T, sm_scale * LOG2E,
        BLOCK_D=block_d, BLOCK_K=_pow2(max(num_dirs, 1)),
        BLOCK_S=_pow2(max(num_spans, 1)), CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
        HAS_SCALE=head_scale is not None, HAS_READOUT=num_dirs > 0, HAS_MASS=num_spans > 0,
        WRITE_O=write_o, WRITE_LSE=write_lse, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        READOUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32x3",
    )
    return out


# ---- backward ------------------------------------------------------------------------------------
@triton.jit
def _dkdv_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, lo, hi, offs_n, offs_d, d_ok, T, S,
                  stride_qt, stride_qd, stride_ot, stride_od, causal_offset, sm_scale,
                  BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key block from query blocks [lo, hi) of one head (MASKED: causal mask).
    Rows past T load lse = +inf (p = 0); keys past S are never stored; the key mask is applied
    to the sums at the end (a masked key's p is 0 in every row)."""
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)        # rows that saw no key: p = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # transposed (keys × queries), so every dot has the key block's BLOCK_N rows and p, ds
        # are already the left operands of dv, dk: no transpose of p through shared memory
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale
        p_t = tl.exp(s_t - lse[None, :])                              # [N, M]
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEY_MASK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_mb, stride_ms,
    H, HKV, T, S, D, GROUP, causal_offset, sm_scale, k_grad_scale, v_grad_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one kv head: sums over the queries of every head in its group.
    q/do of any strides; dk, dv share theirs (stride_g*)."""
    pid_n, _, b, kv, _, offs_n, offs_d, col_ok, d_ok = _block(HKV, S, D, 1, BLOCK_N, BLOCK_D)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + kv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + kv * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = 0
    whole = 0                       # query blocks from `whole` on see every key of this block
    if CAUSAL:
        first = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
        whole = tl.minimum(tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M, T)
    for g in range(GROUP):
        h = kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_ob + h * stride_oh
        row_base = (b * H + h) * T
        if CAUSAL:
            dk, dv = _dkdv_queries(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, first, whole,
                                   offs_n, offs_d, d_ok, T, S, stride_qt, stride_qd, stride_ot, stride_od,
                                   causal_offset, sm_scale, BLOCK_M, True, PRECISION)
        dk, dv = _dkdv_queries(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, whole, T,
                               offs_n, offs_d, d_ok, T, S, stride_qt, stride_qd, stride_ot, stride_od,
                               causal_offset, sm_scale, BLOCK_M, False, PRECISION)
    if HAS_KEY_MASK:
        keep = tl.load(KEY_MASK + b * stride_mb + offs_n * stride_ms, mask=col_ok, other=0)[:, None] != 0
        dk = tl.where(keep, dk, 0.0)
        dv = tl.where(keep, dv, 0.0)
    g_off = b * stride_gb + kv * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :] * stride_gd
    tl.store(DK + g_off, (dk * (sm_scale * k_grad_scale)).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, (dv * v_grad_scale).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_keys(dq, q, do, lse, delta, k_base, v_base, lo, hi, offs_m, offs_d, d_ok, S, b, KEY_MASK,
             stride_ks, stride_kd, stride_vs, stride_vd, stride_mb, stride_ms, causal_offset, sm_scale,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
             PRECISION: tl.constexpr):
    """dQ of one query block from key blocks [lo, hi) (MASKED: bounds and causal mask)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        p = tl.exp(s - lse[:, None])
        if MASKED or HAS_KEY_MASK:
            visible = _visible(offs_m, offs_n, S, b, KEY_MASK, stride_mb, stride_ms, causal_offset,
                               MASKED, CAUSAL, HAS_KEY_MASK)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_MASK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    H, T, S, D, GROUP, causal_offset, sm_scale, q_grad_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query block of one head (a second pass: no atomics, deterministic)."""
    pid_m, pid_bh, b, h, kv, offs_m, offs_d, row_ok, d_ok = _block(H, T, D, GROUP, BLOCK_M, BLOCK_D)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kv * stride_kh
    v_base = V + b * stride_vb + kv * stride_vh
    whole, end = _key_range(S, pid_m, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_keys(dq, q, do, lse, delta, k_base, v_base, 0, whole, offs_m, offs_d, d_ok, S, b, KEY_MASK,
                  stride_ks, stride_kd, stride_vs, stride_vd, stride_mb, stride_ms, causal_offset, sm_scale,
                  BLOCK_N, False, CAUSAL, HAS_KEY_MASK, PRECISION)
    dq = _dq_keys(dq, q, do, lse, delta, k_base, v_base, whole, end, offs_m, offs_d, d_ok, S, b, KEY_MASK,
                  stride_ks, stride_kd, stride_vs, stride_vd, stride_mb, stride_ms, causal_offset, sm_scale,
                  BLOCK_N, True, CAUSAL, HAS_KEY_MASK, PRECISION)
    tl.store(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
             (dq * (sm_scale * q_grad_scale)).to(DQ.dtype.element_ty), mask=q_mask)


# AttnLRP (docs/design.md §3): uniform rule on QKᵀ and on AV → grad q, k × ¼ and grad v × ½.
LRP_GRAD_SCALES = {"q": 0.25, "k": 0.25, "v": 0.5}


def attention_bwd(do, q, k, v, o, lse, *, causal: bool = False, key_mask=None, sm_scale: float | None = None,
                  lrp: bool = False, delta=None, traceable: bool = False):
    """Gradients of o = softmax(q kᵀ · scale) v (o unscaled by any head scale; `do` the gradient
    at that o) → (dq, dk, dv, relevance), relevance [b, H, T] = Σ_d do ⊙ o per row (the rowsum
    the flash backward needs anyway; with lrp=True it is each head's AttnLRP relevance). lrp=True
    also scales dq, dk by ¼ and dv by ½. `delta` overrides the rowsum (a caller whose output was
    scaled after the kernel passes Σ grad ⊙ output, which is the same number). q, k, v, do of any
    strides (read in place); dq, dk, dv come back contiguous."""
    q, k, v, do = (_addressable(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"), (do, "do")))
    b, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    relevance = (do.float() * o.float()).sum(-1) if delta is None else delta.float().contiguous()   # [b, H, T]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    mask_i = key_mask.to(device=q.device, dtype=torch.int8) if key_mask is not None else None
    mask_strides = mask_i.stride() if key_mask is not None else (0, 0)
    block_d = _pow2(D)
    dkdv_shapes, dq_shapes = launch.backward_candidates(block_d, q.dtype, causal)
    scales = LRP_GRAD_SCALES if lrp else {"q": 1.0, "k": 1.0, "v": 1.0}
    common = dict(BLOCK_D=block_d, CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    lse = lse.contiguous()
    launch.launch(
        _attention_bwd_dkdv, dkdv_shapes, lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * b * Hkv,), traceable,
        q, k, v, do, lse, relevance, dk, dv, mask_i, *q.stride(), *do.stride(), *k.stride(), *v.stride(),
        *dk.stride(), *mask_strides, H, Hkv, T, S, D, H // Hkv, S - T, sm_scale, scales["k"], scales["v"], **common)
    launch.launch(
        _attention_bwd_dq, dq_shapes, lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * b * H,), traceable,
        q, k, v, do, lse, relevance, dq, mask_i, *q.stride(), *do.stride(), *dq.stride(), *k.stride(),
        *v.stride(), *mask_strides, H, T, S, D, H // Hkv, S - T, sm_scale, scales["q"], **common)
    return dq, dk, dv, relevance

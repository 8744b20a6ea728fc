"""RMSNorm of q and k with a learnable weight, then rotary position embedding.

q, k [B, L, H, Dh], often strided views of the fused qkv projection [B, L, 3, H, Dh] (read in place, no copy).
Weights [Dh] normalise each head (SD3.5, FLUX); weights [H * Dh] normalise all heads of a token together, one
RMS over its H * Dh features with a weight per feature (LTX-2: RMSNorm over the inner dim), and RoPE still
rotates within each head. cos, sin [B, L, H, Dh/2] or any shape that broadcasts to it ([L, Dh/2] is one row
per token), or None for no RoPE (SD3.5). RoPE rotates pairs of channels: interleaved pairs (2i, 2i+1) as in
FLUX, or split halves (i, i + Dh/2) as in LTX-2. Both kernels work on the two members of every pair as two
[rows, Dh/2] tiles, so the layouts differ only in which columns are loaded. Outputs are contiguous
[B, L, H, Dh], the layout SDPA reads after a transpose.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ._common import _up, launcher, row_tiling, tl, triton, use_triton

# ----------------------------------------------------------------------------------------------------------
# Shapes (both backends check them first) and the reference (fp32 math, results in the input dtypes)


def rope_table(t):
    # cos or sin -> a view that broadcasts against x [B, L, H, Dh] as [B, L, H, Dh/2]: [L, Dh/2] (the usual
    # position table) is one row per token, larger tables broadcast as they are
    return t[:, None] if t.dim() == 2 else t


def k_tables(cos, sin, k_cos, k_sin):
    # k's RoPE tables: its own (k_cos, k_sin) where given (cross-attention between two token sets, LTX-2's a2v / v2a),
    # else q's
    if (k_cos is None) != (k_sin is None):
        raise ValueError("k_cos and k_sin must both be given or both be None")
    if k_cos is not None and cos is None:
        raise ValueError("k_cos / k_sin are k's own RoPE tables: give q's cos / sin too")
    return (cos, sin) if k_cos is None else (k_cos, k_sin)


def check_qk(q, k, q_weight, k_weight, cos, sin, k_cos=None, k_sin=None):
    for name, x, w in (("q", q, q_weight), ("k", k, k_weight)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, Dh], got {tuple(x.shape)}")
        B, L, H, Dh = x.shape
        if w.shape not in ((Dh,), (H * Dh,)):
            raise ValueError(
                f"{name}_weight must be [Dh] or [H * Dh] for {name} {tuple(x.shape)}, got {tuple(w.shape)}"
            )
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    if cos is None:
        k_tables(cos, sin, k_cos, k_sin)
        return
    for name, x, (c, s), prefix in (
        ("q", q, (cos, sin), ""),
        ("k", k, k_tables(cos, sin, k_cos, k_sin), "k_" if k_cos is not None else ""),
    ):
        B, L, H, Dh = x.shape
        if Dh % 2:
            raise ValueError(f"RoPE needs an even head dim, got {name} {tuple(x.shape)}")
        for tname, t in ((prefix + "cos", c), (prefix + "sin", s)):
            t4 = rope_table(t)
            if t4.dim() > 4 or any(a not in (1, b) for a, b in zip(t4.shape[::-1], (Dh // 2, H, L, B))):
                raise ValueError(
                    f"{tname} must broadcast to [B, L, H, Dh/2] = {(B, L, H, Dh // 2)} for "
                    f"{name} {tuple(x.shape)}, got {tuple(t.shape)}"
                )


def qk_norm_rope_ref(q, k, q_weight, k_weight, cos=None, sin=None, eps=1e-6, interleaved=True, k_cos=None, k_sin=None):
    check_qk(q, k, q_weight, k_weight, cos, sin, k_cos, k_sin)

    def norm(t, w):  # F.rms_norm: one fused op on CPU, same fp32 math as x * rsqrt(mean(x^2) + eps) * w
        if w.numel() == t.shape[-1]:
            return torch.nn.functional.rms_norm(t.float(), t.shape[-1:], w.float(), eps)
        return torch.nn.functional.rms_norm(t.float().flatten(-2), w.shape, w.float(), eps).view(t.shape)

    def rope(t, cos, sin):
        if cos is None:
            return t
        c, s = rope_table(cos), rope_table(sin)
        if interleaved:
            t1, t2 = t[..., 0::2], t[..., 1::2]
            return torch.stack([t1 * c - t2 * s, t1 * s + t2 * c], -1).flatten(-2)
        t1, t2 = t.chunk(2, -1)
        return torch.cat([t1 * c - t2 * s, t1 * s + t2 * c], -1)

    return (
        rope(norm(q, q_weight), cos, sin).to(q.dtype),
        rope(norm(k, k_weight), *k_tables(cos, sin, k_cos, k_sin)).to(k.dtype),
    )


# ----------------------------------------------------------------------------------------------------------
# Kernels. Rows are the B*L*H heads; row r is head (b, l, h) = (r // (L*H), r // H % L, r % H). A tile holds
# BLOCK_M rows (e.g. 16 heads of 128 channels), so the grid stays small for 128-wide rows; a program owns
# `rows` of them. ACROSS ([H * Dh] weights): a tile is the H heads of one token (BLOCK_M >= H), its norm
# group, so the tiles step by H rows and the sums of the norm run over the whole tile.


@triton.jit
def _pair_columns(Dh, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    # pair i in [0, Dh/2) -> its two channels
    i = tl.arange(0, BLOCK_H)
    if INTERLEAVED:
        return i, 2 * i, 2 * i + 1, i < Dh // 2
    return i, i, i + Dh // 2, i < Dh // 2


@triton.jit
def _tile_rows(r0, R, H, BLOCK_M: tl.constexpr, ACROSS: tl.constexpr):
    # the rows of the tile that starts at row r0, and which of them are real
    r = r0 + tl.arange(0, BLOCK_M)
    if ACROSS:
        return r, (r < R) & (tl.arange(0, BLOCK_M) < H)
    else:
        return r, r < R


@triton.jit
def _group_sum(a1, a2, ACROSS: tl.constexpr):
    # sum of a1 + a2 over each row's norm group: its head ([BLOCK_M, 1]) or all heads of the token (scalar)
    s = tl.sum(a1, 1) + tl.sum(a2, 1)
    if ACROSS:
        return tl.sum(s, 0)
    else:
        return s[:, None]


@triton.jit
def _load_weight(W, c, imask, H, Dh, BLOCK_M: tl.constexpr, ACROSS: tl.constexpr):
    # the weight at channels c: [Dh], shared by the heads -> [1, BLOCK_H]; [H * Dh] -> [BLOCK_M, BLOCK_H]
    if ACROSS:
        h = tl.arange(0, BLOCK_M)
        wmask = (h < H)[:, None] & imask[None, :]
        return _up(tl.load(W + h[:, None] * Dh + c[None, :], mask=wmask, other=0.0))
    else:
        return _up(tl.load(W + c, mask=imask, other=0.0))[None, :]


@triton.jit
def _pairs_and_weights(
    W, H, Dh, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, ACROSS: tl.constexpr
):
    # what forward and backward both start with: the rotation pairs' columns and the weight at both of them
    i, c1, c2, imask = _pair_columns(Dh, BLOCK_H, INTERLEAVED)
    w1 = _load_weight(W, c1, imask, H, Dh, BLOCK_M, ACROSS)
    w2 = _load_weight(W, c2, imask, H, Dh, BLOCK_M, ACROSS)
    return i, c1, c2, imask, w1, w2


@triton.jit
def _store_dweight(P, dw, c, imask, H, Dh, BLOCK_M: tl.constexpr, ACROSS: tl.constexpr):
    # this program's dweight partial sums dw [BLOCK_M, BLOCK_H] at channels c (rows are heads when ACROSS)
    if ACROSS:
        h = tl.arange(0, BLOCK_M)
        tl.store(P + h[:, None] * Dh + c[None, :], dw, mask=(h < H)[:, None] & imask[None, :])
    else:
        tl.store(P + c, tl.sum(dw, 0), mask=imask)


@triton.jit
def _load_rows(X, r, rmask, c1, c2, imask, L, H, N, s_xb, s_xl, s_xh, eps, ACROSS: tl.constexpr):
    # rows r = heads (b, l, h) of X -> mask, the two channels of every pair (fp32), 1/rms over the N features
    # of the norm group, and (b, l, h)
    mask = rmask[:, None] & imask[None, :]
    b, l, h = r // (L * H), r // H % L, r % H
    x_row = (b.to(tl.int64) * s_xb + l.to(tl.int64) * s_xl + h * s_xh)[:, None]
    x1 = _up(tl.load(X + x_row + c1[None, :], mask=mask, other=0.0))
    x2 = _up(tl.load(X + x_row + c2[None, :], mask=mask, other=0.0))
    rstd = tl.rsqrt(_group_sum(x1 * x1, x2 * x2, ACROSS) / N + eps)
    return mask, x1, x2, rstd, b, l, h


@triton.jit
def _load_cos_sin(COS, SIN, b, l, h, i, mask, s_cb, s_cl, s_ch, s_cd):
    c_row = (b.to(tl.int64) * s_cb + l.to(tl.int64) * s_cl + h * s_ch)[:, None]
    cos = _up(tl.load(COS + c_row + i[None, :] * s_cd, mask=mask, other=0.0))
    sin = _up(tl.load(SIN + c_row + i[None, :] * s_cd, mask=mask, other=0.0))
    return cos, sin


@triton.jit
def _qk_fwd(
    X,
    W,
    COS,
    SIN,
    OUT,
    R,
    L,
    H,
    Dh,
    N,
    s_xb,
    s_xl,
    s_xh,
    s_cb,
    s_cl,
    s_ch,
    s_cd,
    rows,
    eps,
    HAS_ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ACROSS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    r0 = tl.program_id(0) * rows
    i, c1, c2, imask, w1, w2 = _pairs_and_weights(W, H, Dh, BLOCK_M, BLOCK_H, INTERLEAVED, ACROSS)
    if ACROSS:
        step = H
    else:
        step = BLOCK_M
    for j in range(0, rows, step):
        r, rmask = _tile_rows(r0 + j, R, H, BLOCK_M, ACROSS)
        mask, x1, x2, rstd, b, l, h = _load_rows(X, r, rmask, c1, c2, imask, L, H, N, s_xb, s_xl, s_xh, eps, ACROSS)
        n1 = x1 * rstd * w1
        n2 = x2 * rstd * w2
        if HAS_ROPE:
            cos, sin = _load_cos_sin(COS, SIN, b, l, h, i, mask, s_cb, s_cl, s_ch, s_cd)
            n1, n2 = n1 * cos - n2 * sin, n1 * sin + n2 * cos
        o_row = r.to(tl.int64)[:, None] * Dh
        tl.store(OUT + o_row + c1[None, :], n1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + o_row + c2[None, :], n2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qk_bwd(
    X,
    W,
    COS,
    SIN,
    DOUT,
    DX,
    PARTIAL,
    R,
    L,
    H,
    Dh,
    N,
    s_xb,
    s_xl,
    s_xh,
    s_cb,
    s_cl,
    s_ch,
    s_cd,
    rows,
    eps,
    HAS_ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ACROSS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # RoPE backward is the inverse rotation (sin -> -sin); then RMSNorm backward with weight.
    # PARTIAL [programs, weight size]: this program's sum over its rows of dn * xhat (-> dweight).
    pid = tl.program_id(0)
    r0 = pid * rows
    i, c1, c2, imask, w1, w2 = _pairs_and_weights(W, H, Dh, BLOCK_M, BLOCK_H, INTERLEAVED, ACROSS)
    dw1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=w1.dtype)
    dw2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=w1.dtype)
    if ACROSS:
        step = H
    else:
        step = BLOCK_M
    for j in range(0, rows, step):
        r, rmask = _tile_rows(r0 + j, R, H, BLOCK_M, ACROSS)
        mask, x1, x2, rstd, b, l, h = _load_rows(X, r, rmask, c1, c2, imask, L, H, N, s_xb, s_xl, s_xh, eps, ACROSS)
        xh1 = x1 * rstd
        xh2 = x2 * rstd
        o_row = r.to(tl.int64)[:, None] * Dh
        dn1 = _up(tl.load(DOUT + o_row + c1[None, :], mask=mask, other=0.0))
        dn2 = _up(tl.load(DOUT + o_row + c2[None, :], mask=mask, other=0.0))
        if HAS_ROPE:
            cos, sin = _load_cos_sin(COS, SIN, b, l, h, i, mask, s_cb, s_cl, s_ch, s_cd)
            dn1, dn2 = dn1 * cos + dn2 * sin, dn2 * cos - dn1 * sin
        dw1 += dn1 * xh1
        dw2 += dn2 * xh2
        g1 = dn1 * w1
        g2 = dn2 * w2
        c = _group_sum(g1 * xh1, g2 * xh2, ACROSS) / N
        tl.store(DX + o_row + c1[None, :], ((g1 - xh1 * c) * rstd).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + o_row + c2[None, :], ((g2 - xh2 * c) * rstd).to(DX.dtype.element_ty), mask=mask)
    p = PARTIAL + pid.to(tl.int64) * N
    _store_dweight(p, dw1, c1, imask, H, Dh, BLOCK_M, ACROSS)
    _store_dweight(p, dw2, c2, imask, H, Dh, BLOCK_M, ACROSS)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops and autograd. q and k are two launches of the same kernel (they may differ in L).


def _rope_args(x, cos, sin):
    # cos/sin as [B, L, H, Dh/2] broadcast views (stride 0 where broadcast, no copy): 4 strides shared by both
    if cos is None:
        return x, x, (0, 0, 0, 0)  # never read: HAS_ROPE=False
    B, L, H, Dh = x.shape
    cos, sin = torch.broadcast_tensors(rope_table(cos), rope_table(sin))
    if cos.stride() != sin.stride():  # densify at the tables' common shape (small), not at [B, L, H, Dh/2]
        cos, sin = cos.contiguous(), sin.contiguous()
    cos, sin = cos.broadcast_to((B, L, H, Dh // 2)), sin.broadcast_to((B, L, H, Dh // 2))
    return cos, sin, cos.stride()


def _tiling(x, across, backward):
    # -> BLOCK_M, BLOCK_D, rows (heads) per program, programs, warps
    B, L, H, Dh = x.shape
    if not across:
        return row_tiling(B * L * H, 1, Dh, x.device, backward, tile=2048)
    # a tile is the H heads of one token (LTX-2: 32 x 128); row_tiling sizes the tokens per program
    BLOCK_M, BLOCK_D = triton.next_power_of_2(H), triton.next_power_of_2(Dh)
    _, _, tokens, programs, _ = row_tiling(B * L, 1, BLOCK_M * BLOCK_D, x.device, backward, tile=2048)
    return BLOCK_M, BLOCK_D, tokens * H, programs, min(16, max(1, BLOCK_M * BLOCK_D // 256))


def _launch(kernel, x, w, cos, sin, eps, interleaved, dout=None):
    B, L, H, Dh = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos_, sin_, s_c = _rope_args(x, cos, sin)
    out = torch.empty(B, L, H, Dh, device=x.device, dtype=x.dtype)  # y (forward) or dx (backward)
    across = w.numel() != Dh  # [H * Dh] weights: one norm over all heads of a token
    BLOCK_M, BLOCK_D, rows, programs, num_warps = _tiling(x, across, backward=dout is not None)
    args = [x, w, cos_, sin_]
    if dout is not None:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        partial = torch.empty(programs, w.numel(), device=x.device, dtype=acc)
        args += [dout.contiguous(), out, partial]  # dout of .sum().backward() is a stride-0 expand
    else:
        args += [out]
    launcher(kernel)[(programs,)](
        *args,
        B * L * H,
        L,
        H,
        Dh,
        w.numel(),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        *s_c,
        rows,
        eps,
        HAS_ROPE=cos is not None,
        INTERLEAVED=interleaved,
        ACROSS=across,
        BLOCK_M=BLOCK_M,
        BLOCK_H=BLOCK_D // 2,
        num_warps=num_warps,
    )
    return out if dout is None else (out, partial.sum(0).to(w.dtype))


@triton_op("paretoslider::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    k_cos: Optional[Tensor],
    k_sin: Optional[Tensor],
    eps: float,
    interleaved: bool,
) -> tuple[Tensor, Tensor]:
    return (
        _launch(_qk_fwd, q, q_weight, cos, sin, eps, interleaved),
        _launch(_qk_fwd, k, k_weight, k_cos, k_sin, eps, interleaved),
    )


@triton_op("paretoslider::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(
    dq: Tensor,
    dk: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    k_cos: Optional[Tensor],
    k_sin: Optional[Tensor],
    eps: float,
    interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dqw = _launch(_qk_bwd, q, q_weight, cos, sin, eps, interleaved, dout=dq)
    dk, dkw = _launch(_qk_bwd, k, k_weight, k_cos, k_sin, eps, interleaved, dout=dk)
    return dq, dk, dqw, dkw


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, k_cos, k_sin, eps, interleaved = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, k_cos, k_sin)
    ctx.eps, ctx.interleaved = eps, interleaved


def _backward(ctx, dq, dk):
    q, k, q_weight, k_weight, cos, sin, k_cos, k_sin = ctx.saved_tensors
    dq = torch.zeros_like(q) if dq is None else dq
    dk = torch.zeros_like(k) if dk is None else dk
    grads = torch.ops.paretoslider.qk_norm_rope_bwd(
        dq, dk, q, k, q_weight, k_weight, cos, sin, k_cos, k_sin, ctx.eps, ctx.interleaved
    )
    return *grads, None, None, None, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup)

# ----------------------------------------------------------------------------------------------------------
# Public function


def qk_norm_rope(q, k, q_weight, k_weight, cos=None, sin=None, eps=1e-6, interleaved=True, k_cos=None, k_sin=None):
    # -> (q, k) normalised and rotated, contiguous [B, L, H, Dh] in the input dtypes. k_cos / k_sin: k's own RoPE
    # tables (k at other positions than q: cross-attention); by default k shares q's.
    # RoPE tables are constants: if one needs a gradient, the reference computes it (and an odd head dim,
    # which has no channel pairs).
    check_qk(q, k, q_weight, k_weight, cos, sin, k_cos, k_sin)
    kc, ks = k_tables(cos, sin, k_cos, k_sin)
    rope_grad = any(t is not None and t.requires_grad for t in (cos, sin, kc, ks))
    if not (use_triton(q) and use_triton(k)) or rope_grad or q.shape[-1] % 2 or k.shape[-1] % 2:
        return qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps, interleaved, k_cos, k_sin)
    return torch.ops.paretoslider.qk_norm_rope(
        q, k, q_weight, k_weight, cos, sin, kc, ks, float(eps), bool(interleaved)
    )

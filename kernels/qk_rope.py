"""Per-head RMSNorm of q and k with a learnable weight, then rotary position embedding.

q, k [B, L, H, Dh], often strided views of the fused qkv projection [B, L, 3, H, Dh] (read in place, no copy);
weights [Dh]; cos, sin broadcastable to [B, L, H, Dh/2] (fp32) or None for no RoPE (SD3.5).
RoPE rotates pairs of channels: interleaved pairs (2i, 2i+1) as in FLUX, or split halves (i, i + Dh/2) as in
LTX-2. Both kernels work on the two members of every pair as two [rows, Dh/2] tiles, so the layouts differ
only in which columns are loaded. Outputs are contiguous [B, L, H, Dh], the layout SDPA reads after a transpose.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ._common import _up, launcher, row_tiling, tl, triton, use_triton

# ----------------------------------------------------------------------------------------------------------
# Reference (fp32 math, results in the input dtypes)


def qk_norm_rope_ref(q, k, q_weight, k_weight, cos=None, sin=None, eps=1e-6, interleaved=True):
    def norm(t, w):  # F.rms_norm: one fused op on CPU, same fp32 math as x * rsqrt(mean(x^2) + eps) * w
        return torch.nn.functional.rms_norm(t.float(), t.shape[-1:], w.float(), eps)

    def rope(t):
        if cos is None:
            return t
        if interleaved:
            t1, t2 = t[..., 0::2], t[..., 1::2]
            return torch.stack([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1).flatten(-2)
        t1, t2 = t.chunk(2, -1)
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    return rope(norm(q, q_weight)).to(q.dtype), rope(norm(k, k_weight)).to(k.dtype)


# ----------------------------------------------------------------------------------------------------------
# Kernels. Rows are the B*L*H heads; a program owns `rows` of them, BLOCK_M (e.g. 16 of 128 channels) at a
# time, so the grid stays small for 128-wide rows. Row r is head (b, l, h) = (r // (L*H), r // H % L, r % H).


@triton.jit
def _pair_columns(Dh, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    # pair i in [0, Dh/2) -> its two channels
    i = tl.arange(0, BLOCK_H)
    if INTERLEAVED:
        return i, 2 * i, 2 * i + 1, i < Dh // 2
    return i, i, i + Dh // 2, i < Dh // 2


@triton.jit
def _load_rows(X, r, c1, c2, imask, R, L, H, Dh, s_xb, s_xl, s_xh, eps):
    # rows r = heads (b, l, h) of X -> mask, the two channels of every pair (fp32), 1/rms, and (b, l, h)
    mask = (r < R)[:, None] & imask[None, :]
    b, l, h = r // (L * H), r // H % L, r % H
    x_row = (b.to(tl.int64) * s_xb + l.to(tl.int64) * s_xl + h * s_xh)[:, None]
    x1 = _up(tl.load(X + x_row + c1[None, :], mask=mask, other=0.0))
    x2 = _up(tl.load(X + x_row + c2[None, :], mask=mask, other=0.0))
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / Dh + eps)[:, None]
    return mask, x1, x2, rstd, b, l, h


@triton.jit
def _load_cos_sin(COS, SIN, b, l, h, i, mask, s_cb, s_cl, s_ch, s_cd):
    c_row = (b.to(tl.int64) * s_cb + l.to(tl.int64) * s_cl + h * s_ch)[:, None]
    cos = _up(tl.load(COS + c_row + i[None, :] * s_cd, mask=mask, other=0.0))
    sin = _up(tl.load(SIN + c_row + i[None, :] * s_cd, mask=mask, other=0.0))
    return cos, sin


@triton.jit
def _qk_fwd(X, W, COS, SIN, OUT, R, L, H, Dh, s_xb, s_xl, s_xh, s_cb, s_cl, s_ch, s_cd, rows, eps,
            HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    r0 = tl.program_id(0) * rows
    i, c1, c2, imask = _pair_columns(Dh, BLOCK_H, INTERLEAVED)
    w1 = _up(tl.load(W + c1, mask=imask, other=0.0))
    w2 = _up(tl.load(W + c2, mask=imask, other=0.0))
    for j in range(0, rows, BLOCK_M):
        r = r0 + j + tl.arange(0, BLOCK_M)
        mask, x1, x2, rstd, b, l, h = _load_rows(X, r, c1, c2, imask, R, L, H, Dh, s_xb, s_xl, s_xh, eps)
        n1 = x1 * rstd * w1[None, :]
        n2 = x2 * rstd * w2[None, :]
        if HAS_ROPE:
            cos, sin = _load_cos_sin(COS, SIN, b, l, h, i, mask, s_cb, s_cl, s_ch, s_cd)
            n1, n2 = n1 * cos - n2 * sin, n1 * sin + n2 * cos
        o_row = r.to(tl.int64)[:, None] * Dh
        tl.store(OUT + o_row + c1[None, :], n1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + o_row + c2[None, :], n2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qk_bwd(X, W, COS, SIN, DOUT, DX, PARTIAL, R, L, H, Dh, s_xb, s_xl, s_xh, s_cb, s_cl, s_ch, s_cd, rows, eps,
            HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    # RoPE backward is the inverse rotation (sin -> -sin); then RMSNorm backward with weight.
    # PARTIAL [programs, Dh]: this program's sum over its rows of dn * xhat (-> dweight).
    pid = tl.program_id(0)
    r0 = pid * rows
    i, c1, c2, imask = _pair_columns(Dh, BLOCK_H, INTERLEAVED)
    w1 = _up(tl.load(W + c1, mask=imask, other=0.0))
    w2 = _up(tl.load(W + c2, mask=imask, other=0.0))
    dw1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=w1.dtype)
    dw2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=w1.dtype)
    for j in range(0, rows, BLOCK_M):
        r = r0 + j + tl.arange(0, BLOCK_M)
        mask, x1, x2, rstd, b, l, h = _load_rows(X, r, c1, c2, imask, R, L, H, Dh, s_xb, s_xl, s_xh, eps)
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
        g1 = dn1 * w1[None, :]
        g2 = dn2 * w2[None, :]
        c = ((tl.sum(g1 * xh1, 1) + tl.sum(g2 * xh2, 1)) / Dh)[:, None]
        tl.store(DX + o_row + c1[None, :], ((g1 - xh1 * c) * rstd).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + o_row + c2[None, :], ((g2 - xh2 * c) * rstd).to(DX.dtype.element_ty), mask=mask)
    p = PARTIAL + pid.to(tl.int64) * Dh
    tl.store(p + c1, tl.sum(dw1, 0), mask=imask)
    tl.store(p + c2, tl.sum(dw2, 0), mask=imask)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops and autograd. q and k are two launches of the same kernel (they may differ in L).


def _rope_args(x, cos, sin):
    # cos/sin as [B, L, H, Dh/2] broadcast views (stride 0 where broadcast): 4 strides shared by both
    if cos is None:
        return x, x, (0, 0, 0, 0)  # never read: HAS_ROPE=False
    B, L, H, Dh = x.shape
    cos, sin = torch.broadcast_to(cos, (B, L, H, Dh // 2)), torch.broadcast_to(sin, (B, L, H, Dh // 2))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride()


def _launch(kernel, x, w, cos, sin, eps, interleaved, dout=None):
    B, L, H, Dh = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos_, sin_, s_c = _rope_args(x, cos, sin)
    out = torch.empty(B, L, H, Dh, device=x.device, dtype=x.dtype)  # y (forward) or dx (backward)
    R = B * L * H
    BLOCK_M, BLOCK_D, rows, programs, num_warps = row_tiling(R, 1, Dh, x.device, backward=dout is not None,
                                                             tile=2048)
    args = [x, w, cos_, sin_]
    if dout is not None:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        partial = torch.empty(programs, Dh, device=x.device, dtype=acc)
        args += [dout.contiguous(), out, partial]  # dout of .sum().backward() is a stride-0 expand
    else:
        args += [out]
    launcher(kernel)[(programs,)](
        *args, R, L, H, Dh, x.stride(0), x.stride(1), x.stride(2), *s_c, rows, eps,
        HAS_ROPE=cos is not None, INTERLEAVED=interleaved, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_D // 2,
        num_warps=num_warps)
    return out if dout is None else (out, partial.sum(0).to(w.dtype))


@triton_op("paretoslider::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Optional[Tensor],
                     sin: Optional[Tensor], eps: float, interleaved: bool) -> tuple[Tensor, Tensor]:
    return (_launch(_qk_fwd, q, q_weight, cos, sin, eps, interleaved),
            _launch(_qk_fwd, k, k_weight, cos, sin, eps, interleaved))


@triton_op("paretoslider::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd_op(dq: Tensor, dk: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
                         cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
                         interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dqw = _launch(_qk_bwd, q, q_weight, cos, sin, eps, interleaved, dout=dq)
    dk, dkw = _launch(_qk_bwd, k, k_weight, cos, sin, eps, interleaved, dout=dk)
    return dq, dk, dqw, dkw


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps, interleaved = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.eps, ctx.interleaved = eps, interleaved


def _backward(ctx, dq, dk):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq = torch.zeros_like(q) if dq is None else dq
    dk = torch.zeros_like(k) if dk is None else dk
    grads = torch.ops.paretoslider.qk_norm_rope_bwd(dq, dk, q, k, q_weight, k_weight, cos, sin, ctx.eps,
                                                    ctx.interleaved)
    return *grads, None, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup)

# ----------------------------------------------------------------------------------------------------------
# Public function


def qk_norm_rope(q, k, q_weight, k_weight, cos=None, sin=None, eps=1e-6, interleaved=True):
    # -> (q, k) normalised and rotated, contiguous [B, L, H, Dh] in the input dtypes.
    # RoPE tables are constants: if one needs a gradient, the reference computes it.
    rope_grad = cos is not None and (cos.requires_grad or sin.requires_grad)
    if not use_triton(q) or rope_grad or q.shape[-1] % 2:
        return qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps, interleaved)
    return torch.ops.paretoslider.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, float(eps), bool(interleaved))

"""adaLN modulate: LayerNorm or RMSNorm without affine, then norm(x) * (1 + scale) + shift.

x [B, T, D]; shift, scale [B, D], one vector per sample (timestep + pooled text + preference)
broadcast over the T tokens, or [B, T, D], one per token (LTX-2 with a timestep per token: conditioning frames
at σ = 0). Memory-bound: the floor is one read and one write of x (+ one read of each per-token tensor).
"""

import torch
from torch import Tensor
from torch.library import triton_op

from ._common import (
    _acc_zeros,
    _cond_grad,
    _cond_tile,
    _cond_vector,
    _token_tile,
    _up,
    check_cond,
    check_tokens,
    cond_strides,
    cond_view,
    launcher,
    per_token,
    row_tiling,
    tl,
    triton,
    use_triton,
)

# ----------------------------------------------------------------------------------------------------------
# Reference (fp32 math, result in x's dtype)


def check_modulate(x, shift, scale):
    check_tokens(x)
    check_cond("shift", shift, x)
    check_cond("scale", scale, x)


def modulate_ref(x, shift, scale, eps=1e-6, rms=False):
    check_modulate(x, shift, scale)
    xf = x.float()
    if rms:
        xf = torch.nn.functional.rms_norm(xf, xf.shape[-1:], eps=eps)
    else:
        xf = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps)
    return (xf * (1 + per_token(scale).float()) + per_token(shift).float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Norm building blocks, shared with the fused residual kernel (residual.py)


@triton.jit
def _normalize(x, mask, D, eps, RMS: tl.constexpr):
    # x [BLOCK_M, BLOCK_D] upcast, zero outside mask -> xhat (zero outside mask), rstd [BLOCK_M]
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _normalize_bwd(g, xhat, rstd, D, RMS: tl.constexpr):
    # g = dL/dxhat -> dL/dx.  LayerNorm: rstd * (g - mean(g) - xhat * mean(g * xhat));
    # RMSNorm has no centring, so the mean(g) term drops out.
    c2 = tl.sum(g * xhat, 1) / D
    if RMS:
        return (g - xhat * c2[:, None]) * rstd[:, None]
    c1 = tl.sum(g, 1) / D
    return (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]


# ----------------------------------------------------------------------------------------------------------
# Kernels. Grid (B, chunks): a program owns `rows` consecutive tokens of one sample, so [B, D] shift/scale are
# loaded once per program, and walks them BLOCK_M rows at a time. TOK_SHIFT / TOK_SCALE: that tensor is
# [B, T, D] (strides s_*_b, s_*_t), read per tile.


@triton.jit
def _modulate_fwd(
    X,
    SHIFT,
    SCALE,
    Y,
    T,
    D,
    s_shift_b,
    s_shift_t,
    s_scale_b,
    s_scale_t,
    rows,
    eps,
    RMS: tl.constexpr,
    TOK_SHIFT: tl.constexpr,
    TOK_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t0 = tl.program_id(1) * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    shift = _cond_vector(SHIFT, b, s_shift_b, cols, cmask, TOK_SHIFT)
    scale = _cond_vector(SCALE, b, s_scale_b, cols, cmask, TOK_SCALE)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        x = _up(tl.load(X + offs, mask=mask, other=0.0))
        xhat, _ = _normalize(x, mask, D, eps, RMS)
        scale1 = 1.0 + _cond_tile(SCALE, scale, b, t, s_scale_b, s_scale_t, cols, mask, TOK_SCALE)  # in fp32
        y = xhat * scale1 + _cond_tile(SHIFT, shift, b, t, s_shift_b, s_shift_t, cols, mask, TOK_SHIFT)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_bwd(
    X,
    SCALE,
    DY,
    DX,
    DSCALE,
    PARTIAL,
    T,
    D,
    s_scale_b,
    s_scale_t,
    rows,
    eps,
    RMS: tl.constexpr,
    TOK_SHIFT: tl.constexpr,
    TOK_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # PARTIAL [B, chunks, 2, D]: this program's sums over its tokens of dy (-> dshift) and dy * xhat (-> dscale)
    # for [B, D] shift/scale; the host adds the chunks up. Deterministic, unlike atomics, and the interpreter
    # runs it. A [B, T, D] scale gets dy * xhat per token in DSCALE; a [B, T, D] shift's gradient is dy itself.
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t0 = chunk * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale = _cond_vector(SCALE, b, s_scale_b, cols, cmask, TOK_SCALE)
    dshift = _acc_zeros(SCALE, BLOCK_M, BLOCK_D)
    dscale = _acc_zeros(SCALE, BLOCK_M, BLOCK_D)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        x = _up(tl.load(X + offs, mask=mask, other=0.0))
        dy = _up(tl.load(DY + offs, mask=mask, other=0.0))
        xhat, rstd = _normalize(x, mask, D, eps, RMS)
        if not TOK_SHIFT:
            dshift += dy
        dscale = _cond_grad(dscale, dy * xhat, DSCALE, offs, mask, TOK_SCALE)
        scale1 = 1.0 + _cond_tile(SCALE, scale, b, t, s_scale_b, s_scale_t, cols, mask, TOK_SCALE)
        dx = _normalize_bwd(dy * scale1, xhat, rstd, D, RMS)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    p = PARTIAL + (b * tl.num_programs(1) + chunk).to(tl.int64) * 2 * D + cols
    tl.store(p, tl.sum(dshift, 0), mask=cmask)
    tl.store(p + D, tl.sum(dscale, 0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees through them) and their autograd


def _launch_fwd(x, shift, scale, eps, rms):
    B, T, D = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, x.device, backward=False)
    launcher(_modulate_fwd)[(B, chunks)](
        x,
        shift,
        scale,
        y,
        T,
        D,
        *cond_strides(shift),
        *cond_strides(scale),
        rows,
        eps,
        RMS=rms,
        TOK_SHIFT=shift.dim() == 3,
        TOK_SCALE=scale.dim() == 3,
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return y


def _launch_bwd(dy, x, scale, eps, rms, shift_per_token):
    # -> dx, token sums [B, 2, D] (dshift, dscale; fp32), dscale [B, T, D] of a per-token scale (else empty)
    B, T, D = x.shape
    x, dy = x.contiguous(), dy.contiguous()  # dy of out.sum() arrives as a stride-0 expand
    dx = torch.empty_like(x)
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, x.device, backward=True)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(B, chunks, 2, D, device=x.device, dtype=acc)
    dscale = torch.empty(B, T, D, device=x.device, dtype=scale.dtype) if scale.dim() == 3 else scale.new_empty(0)
    launcher(_modulate_bwd)[(B, chunks)](
        x,
        scale,
        dy,
        dx,
        dscale if scale.dim() == 3 else dx,
        partial,
        T,
        D,
        *cond_strides(scale),
        rows,
        eps,
        RMS=rms,
        TOK_SHIFT=shift_per_token,
        TOK_SCALE=scale.dim() == 3,
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return dx, partial.sum(1), dscale


@triton_op("paretoslider::modulate", mutates_args=())
def _modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float, rms: bool) -> Tensor:
    return _launch_fwd(x, shift, scale, eps, rms)


@triton_op("paretoslider::modulate_bwd", mutates_args=())
def _modulate_bwd_op(
    dy: Tensor, x: Tensor, scale: Tensor, eps: float, rms: bool, shift_per_token: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_bwd(dy, x, scale, eps, rms, shift_per_token)


def _setup(ctx, inputs, output):
    x, shift, scale, eps, rms = inputs
    ctx.save_for_backward(x, scale)  # not shift: only its dtype and shape matter
    ctx.eps, ctx.rms, ctx.shift_dtype, ctx.shift_per_token = eps, rms, shift.dtype, shift.dim() == 3


def _backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, sums, dscale = torch.ops.paretoslider.modulate_bwd(dy, x, scale, ctx.eps, ctx.rms, ctx.shift_per_token)
    dshift = dy if ctx.shift_per_token else sums[:, 0]  # d(out)/d(shift) is 1 per token
    dscale = dscale if scale.dim() == 3 else sums[:, 1].to(scale.dtype)
    return dx, dshift.to(ctx.shift_dtype), dscale, None, None


_modulate_op.register_autograd(_backward, setup_context=_setup)

# ----------------------------------------------------------------------------------------------------------
# Public function


def modulate(x, shift, scale, eps=1e-6, rms=False):
    # x [B, T, D]; shift, scale [B, D] or [B, T, D] (leading 1: shared by the batch), possibly strided views
    # of the adaLN output.
    check_modulate(x, shift, scale)
    if not use_triton(x):
        return modulate_ref(x, shift, scale, eps, rms)
    return torch.ops.paretoslider.modulate(x, cond_view(shift, x), cond_view(scale, x), float(eps), bool(rms))

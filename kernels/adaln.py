"""adaLN modulate: LayerNorm or RMSNorm without affine, then norm(x) * (1 + scale) + shift.

x [B, T, D]; shift, scale [B, D], one vector per sample (timestep + pooled text + preference, SPEC §1)
broadcast over the T tokens. Memory-bound: the floor is one read and one write of x.
"""
import torch
from torch import Tensor
from torch.library import triton_op

from ._common import _sample_vector, _token_tile, _up, launcher, row_tiling, rowwise, tl, triton, use_triton

# ----------------------------------------------------------------------------------------------------------
# Reference (fp32 math, result in x's dtype)


def modulate_ref(x, shift, scale, eps=1e-6, rms=False):
    xf = x.float()
    if rms:
        xf = torch.nn.functional.rms_norm(xf, xf.shape[-1:], eps=eps)
    else:
        xf = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps)
    return (xf * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


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
# Kernels. Grid (B, chunks): a program owns `rows` consecutive tokens of one sample, so shift/scale are
# loaded once per program, and walks them BLOCK_M rows at a time.


@triton.jit
def _modulate_fwd(X, SHIFT, SCALE, Y, T, D, s_shift, s_scale, rows, eps,
                  RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t0 = tl.program_id(1) * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    shift = _sample_vector(SHIFT, b, s_shift, cols, cmask)
    scale1 = 1.0 + _sample_vector(SCALE, b, s_scale, cols, cmask)  # 1 + scale in fp32
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        x = _up(tl.load(X + offs, mask=mask, other=0.0))
        xhat, _ = _normalize(x, mask, D, eps, RMS)
        y = xhat * scale1[None, :] + shift[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_bwd(X, SCALE, DY, DX, PARTIAL, T, D, s_scale, rows, eps,
                  RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # PARTIAL [B, chunks, 2, D]: this program's sums over its tokens of dy (-> dshift) and dy * xhat (-> dscale);
    # the host adds the chunks up. Deterministic, unlike atomics, and the interpreter runs it.
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t0 = chunk * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale1 = 1.0 + _sample_vector(SCALE, b, s_scale, cols, cmask)
    dshift = tl.zeros([BLOCK_M, BLOCK_D], dtype=scale1.dtype)
    dscale = tl.zeros([BLOCK_M, BLOCK_D], dtype=scale1.dtype)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        x = _up(tl.load(X + offs, mask=mask, other=0.0))
        dy = _up(tl.load(DY + offs, mask=mask, other=0.0))
        xhat, rstd = _normalize(x, mask, D, eps, RMS)
        dshift += dy
        dscale += dy * xhat
        dx = _normalize_bwd(dy * scale1[None, :], xhat, rstd, D, RMS)
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
        x, shift, scale, y, T, D, shift.stride(0), scale.stride(0), rows, eps,
        RMS=rms, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return y


def _launch_bwd(dy, x, scale, eps, rms):
    # -> dx, token sums [B, 2, D] (dshift, dscale)
    B, T, D = x.shape
    x, dy = x.contiguous(), dy.contiguous()  # dy of out.sum() arrives as a stride-0 expand
    dx = torch.empty_like(x)
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, x.device, backward=True)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(B, chunks, 2, D, device=x.device, dtype=acc)
    launcher(_modulate_bwd)[(B, chunks)](
        x, scale, dy, dx, partial, T, D, scale.stride(0), rows, eps,
        RMS=rms, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return dx, partial.sum(1)


@triton_op("paretoslider::modulate", mutates_args=())
def _modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float, rms: bool) -> Tensor:
    return _launch_fwd(x, shift, scale, eps, rms)


@triton_op("paretoslider::modulate_bwd", mutates_args=())
def _modulate_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    return _launch_bwd(dy, x, scale, eps, rms)


def _setup(ctx, inputs, output):
    x, shift, scale, eps, rms = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.rms, ctx.shift_dtype = eps, rms, shift.dtype


def _backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dcond = torch.ops.paretoslider.modulate_bwd(dy, x, scale, ctx.eps, ctx.rms)
    return dx, dcond[:, 0].to(ctx.shift_dtype), dcond[:, 1].to(scale.dtype), None, None


_modulate_op.register_autograd(_backward, setup_context=_setup)

# ----------------------------------------------------------------------------------------------------------
# Public function


def modulate(x, shift, scale, eps=1e-6, rms=False):
    # x [B, T, D]; shift, scale [B, D] (or [1, D]), possibly strided views of the adaLN output.
    if not use_triton(x):
        return modulate_ref(x, shift, scale, eps, rms)
    B, T, D = x.shape
    shift, scale = rowwise(shift.expand(B, D)), rowwise(scale.expand(B, D))
    return torch.ops.paretoslider.modulate(x, shift, scale, float(eps), bool(rms))

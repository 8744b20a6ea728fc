"""Gated residual, and the fused residual -> norm -> modulate that feeds the next sub-layer.

  gated_residual(x, gate, y, m=None)                  x + gate * y, or the slider form x + gate * (y + m)
  gated_residual_modulate(x, gate, y, shift, scale)   (h, modulate(h, shift, scale)) with h = gated_residual(...)

x, y [B, T, D]; gate, shift, scale [B, D] per sample; m [B, D] is the slider vector m(ω) shared by all
blocks (SPEC §1: added after the image-stream MLP residual, x + gate_mlp * (mlp_out + m)).
In a joint block the attention residual is followed by the MLP's norm-modulate. Fused, the forward moves 4
[B, T, D] tensors (read x, y; write h, x_mod) instead of 5 for the two kernels, and the backward 6 instead
of 9 (the two gradients reaching h are added in registers, not by autograd in memory).
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ._common import _sample_vector, _token_tile, _up, launcher, row_tiling, rowwise, tl, triton, use_triton
from .adaln import _normalize, _normalize_bwd, modulate_ref

# ----------------------------------------------------------------------------------------------------------
# References


def gated_residual_ref(x, gate, y, m=None):
    if m is not None:
        y = y + m[:, None]
    return x + gate[:, None] * y


def gated_residual_modulate_ref(x, gate, y, shift, scale, eps=1e-6, rms=False, m=None):
    h = gated_residual_ref(x, gate, y, m)
    return h, modulate_ref(h, shift, scale, eps, rms)


# ----------------------------------------------------------------------------------------------------------
# Kernels. One pair serves both ops: MODULATE=False is the plain gated residual. Grid (B, chunks) as in
# modulate.py: a program owns `rows` tokens of one sample and loads its [D] vectors once.


@triton.jit
def _residual_fwd(X, Y, GATE, M, SHIFT, SCALE, H, XMOD, T, D, s_gate, s_m, s_shift, s_scale, rows, eps,
                  HAS_M: tl.constexpr, MODULATE: tl.constexpr, RMS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t0 = tl.program_id(1) * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = _sample_vector(GATE, b, s_gate, cols, cmask)
    if HAS_M:
        m = _sample_vector(M, b, s_m, cols, cmask)
    if MODULATE:
        shift = _sample_vector(SHIFT, b, s_shift, cols, cmask)
        scale1 = 1.0 + _sample_vector(SCALE, b, s_scale, cols, cmask)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        x = _up(tl.load(X + offs, mask=mask, other=0.0))
        y = _up(tl.load(Y + offs, mask=mask, other=0.0))
        if HAS_M:
            y += m[None, :]
        h = (x + gate[None, :] * y).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        if MODULATE:
            # normalise h as stored (rounded to its dtype), exactly what modulate(h) would read back
            xhat, _ = _normalize(_up(h), mask, D, eps, RMS)
            tl.store(XMOD + offs, (xhat * scale1[None, :] + shift[None, :]).to(XMOD.dtype.element_ty), mask=mask)


@triton.jit
def _residual_bwd(H, Y, GATE, M, SCALE, DH, DXMOD, DY, DX, PARTIAL, T, D, s_gate, s_m, s_scale, rows, eps,
                  HAS_M: tl.constexpr, HAS_DH: tl.constexpr, MODULATE: tl.constexpr, RMS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # dh = dL/dh (from the residual stream) + the norm backward of dL/dx_mod; then dx = dh, dy = gate * dh.
    # PARTIAL [B, chunks, 4, D]: this program's token sums of dh * (y + m) -> dgate, dh -> dm (= gate * sum),
    # dx_mod -> dshift, dx_mod * xhat -> dscale.
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t0 = chunk * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = _sample_vector(GATE, b, s_gate, cols, cmask)
    if HAS_M:
        m = _sample_vector(M, b, s_m, cols, cmask)
    if MODULATE:
        scale1 = 1.0 + _sample_vector(SCALE, b, s_scale, cols, cmask)
    dgate = tl.zeros([BLOCK_M, BLOCK_D], dtype=gate.dtype)
    dsum = tl.zeros([BLOCK_M, BLOCK_D], dtype=gate.dtype)
    dshift = tl.zeros([BLOCK_M, BLOCK_D], dtype=gate.dtype)
    dscale = tl.zeros([BLOCK_M, BLOCK_D], dtype=gate.dtype)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        if HAS_DH:
            dh = _up(tl.load(DH + offs, mask=mask, other=0.0))
        else:
            dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=gate.dtype)
        if MODULATE:
            dxm = _up(tl.load(DXMOD + offs, mask=mask, other=0.0))
            xhat, rstd = _normalize(_up(tl.load(H + offs, mask=mask, other=0.0)), mask, D, eps, RMS)
            dshift += dxm
            dscale += dxm * xhat
            dh += _normalize_bwd(dxm * scale1[None, :], xhat, rstd, D, RMS)
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        y = _up(tl.load(Y + offs, mask=mask, other=0.0))
        if HAS_M:
            y += m[None, :]
            dsum += dh
        dgate += dh * y
        tl.store(DY + offs, (dh * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
    p = PARTIAL + (b * tl.num_programs(1) + chunk).to(tl.int64) * 4 * D + cols
    tl.store(p, tl.sum(dgate, 0), mask=cmask)
    tl.store(p + D, tl.sum(dsum, 0), mask=cmask)
    tl.store(p + 2 * D, tl.sum(dshift, 0), mask=cmask)
    tl.store(p + 3 * D, tl.sum(dscale, 0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops and autograd: a forward and a backward op per public function, one launcher for each pass


def _launch_fwd(x, gate, y, m, shift, scale, eps, rms, modulate):
    B, T, D = x.shape
    x, y = x.contiguous(), y.contiguous()
    h = torch.empty_like(x)
    x_mod = torch.empty_like(x) if modulate else h
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, x.device, backward=False)
    has_m = m is not None
    m = m if has_m else gate  # never read: HAS_M=False
    shift = shift if modulate else gate
    scale = scale if modulate else gate
    launcher(_residual_fwd)[(B, chunks)](
        x, y, gate, m, shift, scale, h, x_mod, T, D,
        gate.stride(0), m.stride(0), shift.stride(0), scale.stride(0), rows, eps,
        HAS_M=has_m, MODULATE=modulate, RMS=rms, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return h, x_mod


@triton_op("paretoslider::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, gate: Tensor, y: Tensor, m: Optional[Tensor]) -> Tensor:
    return _launch_fwd(x, gate, y, m, None, None, 0.0, False, modulate=False)[0]


@triton_op("paretoslider::gated_residual_modulate", mutates_args=())
def _gated_residual_modulate_op(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float,
                                rms: bool, m: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _launch_fwd(x, gate, y, m, shift, scale, eps, rms, modulate=True)


def _launch_bwd(dh, dx_mod, h, y, gate, m, scale, eps, rms):
    # -> dx (only with the norm: otherwise dx = dh, the caller passes it through), dy, token sums [B, 4, D]
    B, T, D = y.shape
    modulate = dx_mod is not None
    y = y.contiguous()
    dh = dh.contiguous() if dh is not None else None  # .sum().backward() hands in stride-0 expands
    dy = torch.empty_like(y)
    dx = torch.empty_like(y) if modulate else None
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, y.device, backward=True)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    partial = torch.empty(B, chunks, 4, D, device=y.device, dtype=acc)
    has_m = m is not None
    unused = y  # placeholder pointer for inputs a constexpr flag switches off
    launcher(_residual_bwd)[(B, chunks)](
        h.contiguous() if modulate else unused, y, gate, m if has_m else gate, scale if modulate else gate,
        dh if dh is not None else unused, dx_mod.contiguous() if modulate else unused, dy,
        dx if modulate else unused, partial, T, D,
        gate.stride(0), m.stride(0) if has_m else 0, scale.stride(0) if modulate else 0, rows, eps,
        HAS_M=has_m, HAS_DH=dh is not None, MODULATE=modulate, RMS=rms,
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return dx, dy, partial.sum(1)


@triton_op("paretoslider::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(dh: Tensor, y: Tensor, gate: Tensor, m: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _, dy, partial = _launch_bwd(dh, None, None, y, gate, m, None, 0.0, False)
    return dy, partial


@triton_op("paretoslider::gated_residual_modulate_bwd", mutates_args=())
def _gated_residual_modulate_bwd_op(dh: Optional[Tensor], dx_mod: Tensor, h: Tensor, y: Tensor, gate: Tensor,
                                    m: Optional[Tensor], scale: Tensor, eps: float,
                                    rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_bwd(dh, dx_mod, h, y, gate, m, scale, eps, rms)


def _cond_grads(partial, gate, m, shift=None, scale=None):
    # partial [B, 4, D] -> dgate, dm, dshift, dscale in their inputs' dtypes
    dgate = partial[:, 0].to(gate.dtype)
    dm = (gate.to(partial.dtype) * partial[:, 1]).to(m.dtype) if m is not None else None
    dshift = partial[:, 2].to(shift.dtype) if shift is not None else None
    dscale = partial[:, 3].to(scale.dtype) if scale is not None else None
    return dgate, dm, dshift, dscale


def _setup_residual(ctx, inputs, output):
    x, gate, y, m = inputs
    ctx.save_for_backward(y, gate, m)
    ctx.x_dtype = x.dtype


def _backward_residual(ctx, dh):
    y, gate, m = ctx.saved_tensors
    dy, partial = torch.ops.paretoslider.gated_residual_bwd(dh, y, gate, m)
    dgate, dm, _, _ = _cond_grads(partial, gate, m)
    return dh.to(ctx.x_dtype), dgate, dy, dm


def _setup_fused(ctx, inputs, output):
    x, gate, y, shift, scale, eps, rms, m = inputs
    ctx.save_for_backward(output[0], y, gate, m, shift, scale)  # h is an output: saving it costs nothing
    ctx.eps, ctx.rms = eps, rms


def _backward_fused(ctx, dh, dx_mod):
    h, y, gate, m, shift, scale = ctx.saved_tensors
    if dx_mod is None:  # only h was used downstream
        dx_mod = torch.zeros_like(h)
    dx, dy, partial = torch.ops.paretoslider.gated_residual_modulate_bwd(dh, dx_mod, h, y, gate, m, scale,
                                                                        ctx.eps, ctx.rms)
    dgate, dm, dshift, dscale = _cond_grads(partial, gate, m, shift, scale)
    return dx, dgate, dy, dshift, dscale, None, None, dm


_gated_residual_op.register_autograd(_backward_residual, setup_context=_setup_residual)
_gated_residual_modulate_op.register_autograd(_backward_fused, setup_context=_setup_fused)

# ----------------------------------------------------------------------------------------------------------
# Public functions


def _fused_dtypes(x, gate, y, m):
    # The kernels write h in x's dtype; mixed dtypes (where torch would promote) take the reference.
    return x.dtype == y.dtype == gate.dtype and (m is None or m.dtype == x.dtype)


def _cond(v, B, D):
    return rowwise(v.expand(B, D)) if v is not None else None


def gated_residual(x, gate, y, m=None):
    # x, y [B, T, D]; gate, m [B, D] (or [1, D])
    if not (use_triton(x) and _fused_dtypes(x, gate, y, m)):
        return gated_residual_ref(x, gate, y, m)
    B, T, D = x.shape
    return torch.ops.paretoslider.gated_residual(x, _cond(gate, B, D), y, _cond(m, B, D))


def gated_residual_modulate(x, gate, y, shift, scale, eps=1e-6, rms=False, m=None):
    # -> (h, x_mod): the new residual stream and the modulated input of the next sub-layer
    if not (use_triton(x) and _fused_dtypes(x, gate, y, m)):
        return gated_residual_modulate_ref(x, gate, y, shift, scale, eps, rms, m)
    B, T, D = x.shape
    return torch.ops.paretoslider.gated_residual_modulate(
        x, _cond(gate, B, D), y, _cond(shift, B, D), _cond(scale, B, D), float(eps), bool(rms), _cond(m, B, D))

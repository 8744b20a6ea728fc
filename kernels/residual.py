"""Gated residual, and the fused residual -> norm -> modulate that feeds the next sub-layer.

  gated_residual(x, gate, y, m=None, m_range=None)    x + gate * y, or the slider form x + gate * (y + m)
  gated_residual_modulate(x, gate, y, shift, scale)   (h, modulate(h, shift, scale)) with h = gated_residual(...)

x, y [B, T, D]; gate, shift, scale [B, D] per sample or [B, T, D] per token (LTX-2); m [B, D] is the slider
vector m(ω) shared by all blocks (ParetoSlider: added after the image-stream MLP residual,
x + gate_mlp * (mlp_out + m)),
on the tokens start..end-1 of m_range = (start, end) only when given (FLUX single-stream blocks carry the text
tokens and then the image tokens in one sequence; the slider touches the image tokens).
In a joint block the attention residual is followed by the MLP's norm-modulate. Fused, the forward moves 4
[B, T, D] tensors (read x, y; write h, x_mod) instead of 5 for the two kernels, and the backward 6 instead
of 9 (the two gradients reaching h are added in registers, not by autograd in memory).
"""

from typing import Optional

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
    check_like,
    check_tokens,
    cond_strides,
    cond_view,
    launcher,
    per_token,
    row_tiling,
    slider_range,
    tl,
    triton,
    use_triton,
)
from .adaln import _normalize, _normalize_bwd, check_modulate, modulate_ref

# ----------------------------------------------------------------------------------------------------------
# References


def check_residual(x, gate, y, m, m_range):
    # -> the slider's token range (start, end)
    check_tokens(x)
    check_like("y", y, x)
    check_cond("gate", gate, x)
    if m is not None:
        check_cond("m", m, x)
    return slider_range(m_range, x.shape[1])


def _add_slider(y, m, m_range):
    if m_range is None:
        return y + per_token(m)
    start, end = m_range
    m = m[:, None] if m.dim() == 2 else m[:, start:end]
    return torch.cat([y[:, :start], y[:, start:end] + m, y[:, end:]], 1)


def gated_residual_ref(x, gate, y, m=None, m_range=None):
    check_residual(x, gate, y, m, m_range)
    if m is not None:
        y = _add_slider(y, m, m_range)
    return x + per_token(gate) * y


def gated_residual_modulate_ref(x, gate, y, shift, scale, eps=1e-6, rms=False, m=None, m_range=None):
    h = gated_residual_ref(x, gate, y, m, m_range)
    return h, modulate_ref(h, shift, scale, eps, rms)


# ----------------------------------------------------------------------------------------------------------
# Kernels. One pair serves both ops: MODULATE=False is the plain gated residual. Grid (B, chunks) as in
# adaln.py: a program owns `rows` tokens of one sample and loads its [B, D] vectors once; TOK_*: that
# conditioning tensor is [B, T, D], read per tile. m is added on tokens m_start <= t < m_end.


@triton.jit
def _slider_tokens(t, m_start, m_end):
    return ((t >= m_start) & (t < m_end))[:, None]


@triton.jit
def _residual_fwd(
    X,
    Y,
    GATE,
    M,
    SHIFT,
    SCALE,
    H,
    XMOD,
    T,
    D,
    s_gate_b,
    s_gate_t,
    s_m_b,
    s_m_t,
    s_shift_b,
    s_shift_t,
    s_scale_b,
    s_scale_t,
    m_start,
    m_end,
    rows,
    eps,
    HAS_M: tl.constexpr,
    MODULATE: tl.constexpr,
    RMS: tl.constexpr,
    TOK_GATE: tl.constexpr,
    TOK_M: tl.constexpr,
    TOK_SHIFT: tl.constexpr,
    TOK_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t0 = tl.program_id(1) * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = _cond_vector(GATE, b, s_gate_b, cols, cmask, TOK_GATE)
    if HAS_M:
        m = _cond_vector(M, b, s_m_b, cols, cmask, TOK_M)
    if MODULATE:
        shift = _cond_vector(SHIFT, b, s_shift_b, cols, cmask, TOK_SHIFT)
        scale = _cond_vector(SCALE, b, s_scale_b, cols, cmask, TOK_SCALE)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        x = _up(tl.load(X + offs, mask=mask, other=0.0))
        y = _up(tl.load(Y + offs, mask=mask, other=0.0))
        if HAS_M:
            mt = _cond_tile(M, m, b, t, s_m_b, s_m_t, cols, mask, TOK_M)
            y = tl.where(_slider_tokens(t, m_start, m_end), y + mt, y)
        g = _cond_tile(GATE, gate, b, t, s_gate_b, s_gate_t, cols, mask, TOK_GATE)
        h = (x + g * y).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        if MODULATE:
            # normalise h as stored (rounded to its dtype), exactly what modulate(h) would read back
            xhat, _ = _normalize(_up(h), mask, D, eps, RMS)
            scale1 = 1.0 + _cond_tile(SCALE, scale, b, t, s_scale_b, s_scale_t, cols, mask, TOK_SCALE)
            x_mod = xhat * scale1 + _cond_tile(SHIFT, shift, b, t, s_shift_b, s_shift_t, cols, mask, TOK_SHIFT)
            tl.store(XMOD + offs, x_mod.to(XMOD.dtype.element_ty), mask=mask)


@triton.jit
def _residual_bwd(H, Y, GATE, M, SCALE, DH, DXMOD, DY, DX, DGATE, DM, DSCALE, PARTIAL, T, D, s_gate_b,
                  s_gate_t, s_m_b, s_m_t, s_scale_b, s_scale_t, m_start, m_end, rows, eps,
                  HAS_M: tl.constexpr, HAS_DH: tl.constexpr, MODULATE: tl.constexpr, RMS: tl.constexpr,
                  TOK_GATE: tl.constexpr, TOK_M: tl.constexpr, TOK_SHIFT: tl.constexpr,
                  TOK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    # dh = dL/dh (from the residual stream) + the norm backward of dL/dx_mod; then dx = dh, dy = gate * dh.
    # PARTIAL [B, chunks, 4, D]: this program's token sums for the [B, D] conditioning: dh * (y + m) -> dgate,
    # dh on m's tokens -> dm (the host multiplies by a [B, D] gate), dx_mod -> dshift, dx_mod * xhat -> dscale.
    # [B, T, D] gate, m, scale get theirs per token in DGATE, DM, DSCALE; a [B, T, D] shift's is dx_mod itself.
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t0 = chunk * rows
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = _cond_vector(GATE, b, s_gate_b, cols, cmask, TOK_GATE)
    if HAS_M:
        m = _cond_vector(M, b, s_m_b, cols, cmask, TOK_M)
    if MODULATE:
        scale = _cond_vector(SCALE, b, s_scale_b, cols, cmask, TOK_SCALE)
    dgate = _acc_zeros(GATE, BLOCK_M, BLOCK_D)
    dsum = _acc_zeros(GATE, BLOCK_M, BLOCK_D)
    dshift = _acc_zeros(GATE, BLOCK_M, BLOCK_D)
    dscale = _acc_zeros(GATE, BLOCK_M, BLOCK_D)
    for i in range(0, rows, BLOCK_M):
        t = t0 + i + tl.arange(0, BLOCK_M)
        mask, offs = _token_tile(b, t, T, D, cols, cmask)
        if HAS_DH:
            dh = _up(tl.load(DH + offs, mask=mask, other=0.0))
        else:
            dh = _acc_zeros(GATE, BLOCK_M, BLOCK_D)
        if MODULATE:
            dxm = _up(tl.load(DXMOD + offs, mask=mask, other=0.0))
            xhat, rstd = _normalize(_up(tl.load(H + offs, mask=mask, other=0.0)), mask, D, eps, RMS)
            if not TOK_SHIFT:
                dshift += dxm
            dscale = _cond_grad(dscale, dxm * xhat, DSCALE, offs, mask, TOK_SCALE)
            scale1 = 1.0 + _cond_tile(SCALE, scale, b, t, s_scale_b, s_scale_t, cols, mask, TOK_SCALE)
            dh += _normalize_bwd(dxm * scale1, xhat, rstd, D, RMS)
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        g = _cond_tile(GATE, gate, b, t, s_gate_b, s_gate_t, cols, mask, TOK_GATE)
        y = _up(tl.load(Y + offs, mask=mask, other=0.0))
        if HAS_M:
            on = _slider_tokens(t, m_start, m_end)
            y = tl.where(on, y + _cond_tile(M, m, b, t, s_m_b, s_m_t, cols, mask, TOK_M), y)
            dm = tl.where(on, dh, 0.0)
            if TOK_M:  # dm = gate * dh on m's tokens, per token
                tl.store(DM + offs, (dm * g).to(DM.dtype.element_ty), mask=mask)
            elif TOK_GATE:  # a per-token gate goes inside the token sum
                dsum += dm * g
            else:  # [B, D] gate and m: the host multiplies the token sum by the gate
                dsum += dm
        dgate = _cond_grad(dgate, dh * y, DGATE, offs, mask, TOK_GATE)
        tl.store(DY + offs, (dh * g).to(DY.dtype.element_ty), mask=mask)
    p = PARTIAL + (b * tl.num_programs(1) + chunk).to(tl.int64) * 4 * D + cols
    tl.store(p, tl.sum(dgate, 0), mask=cmask)
    tl.store(p + D, tl.sum(dsum, 0), mask=cmask)
    tl.store(p + 2 * D, tl.sum(dshift, 0), mask=cmask)
    tl.store(p + 3 * D, tl.sum(dscale, 0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# torch.library ops and autograd: a forward and a backward op per public function, one launcher for each pass


def _launch_fwd(x, gate, y, m, shift, scale, eps, rms, modulate, m_start, m_end):
    B, T, D = x.shape
    x, y = x.contiguous(), y.contiguous()
    h = torch.empty_like(x)
    x_mod = torch.empty_like(x) if modulate else h
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, x.device, backward=False)
    has_m = m is not None
    tok = lambda v: v is not None and v.dim() == 3
    launcher(_residual_fwd)[(B, chunks)](
        x,
        y,
        gate,
        m if has_m else gate,
        shift if modulate else gate,
        scale if modulate else gate,  # unused: gate
        h,
        x_mod,
        T,
        D,
        *cond_strides(gate),
        *cond_strides(m),
        *cond_strides(shift),
        *cond_strides(scale),
        m_start,
        m_end,
        rows,
        eps,
        HAS_M=has_m,
        MODULATE=modulate,
        RMS=rms,
        TOK_GATE=tok(gate),
        TOK_M=tok(m),
        TOK_SHIFT=tok(shift),
        TOK_SCALE=tok(scale),
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return h, x_mod


@triton_op("paretoslider::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, gate: Tensor, y: Tensor, m: Optional[Tensor], m_start: int, m_end: int) -> Tensor:
    return _launch_fwd(x, gate, y, m, None, None, 0.0, False, False, m_start, m_end)[0]


@triton_op("paretoslider::gated_residual_modulate", mutates_args=())
def _gated_residual_modulate_op(
    x: Tensor,
    gate: Tensor,
    y: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    rms: bool,
    m: Optional[Tensor],
    m_start: int,
    m_end: int,
) -> tuple[Tensor, Tensor]:
    return _launch_fwd(x, gate, y, m, shift, scale, eps, rms, True, m_start, m_end)


def _launch_bwd(dh, dx_mod, h, y, gate, m, scale, eps, rms, shift_per_token, m_start, m_end):
    # -> dx (only with the norm: otherwise dx = dh, the caller passes it through), dy, token sums [B, 4, D],
    #    and the per-token gradients of [B, T, D] gate, m, scale (empty for [B, D] ones)
    B, T, D = y.shape
    modulate = dx_mod is not None
    y = y.contiguous()
    dh = dh.contiguous() if dh is not None else None  # .sum().backward() hands in stride-0 expands
    dy = torch.empty_like(y)
    dx = torch.empty_like(y) if modulate else None
    BLOCK_M, BLOCK_D, rows, chunks, num_warps = row_tiling(T, B, D, y.device, backward=True)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    partial = torch.empty(B, chunks, 4, D, device=y.device, dtype=acc)
    tok = lambda v: v is not None and v.dim() == 3
    dtok = [
        torch.empty(B, T, D, device=y.device, dtype=v.dtype) if tok(v) else y.new_empty(0) for v in (gate, m, scale)
    ]
    unused = y  # placeholder pointer for inputs a constexpr flag switches off
    launcher(_residual_bwd)[(B, chunks)](
        h.contiguous() if modulate else unused,
        y,
        gate,
        m if m is not None else gate,
        scale if modulate else gate,
        dh if dh is not None else unused,
        dx_mod.contiguous() if modulate else unused,
        dy,
        dx if modulate else unused,
        *[d if d.numel() else unused for d in dtok],
        partial,
        T,
        D,
        *cond_strides(gate),
        *cond_strides(m),
        *cond_strides(scale),
        m_start,
        m_end,
        rows,
        eps,
        HAS_M=m is not None,
        HAS_DH=dh is not None,
        MODULATE=modulate,
        RMS=rms,
        TOK_GATE=tok(gate),
        TOK_M=tok(m),
        TOK_SHIFT=shift_per_token,
        TOK_SCALE=tok(scale),
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return dx, dy, partial.sum(1), *dtok


@triton_op("paretoslider::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(
    dh: Tensor, y: Tensor, gate: Tensor, m: Optional[Tensor], m_start: int, m_end: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # -> dy, token sums [B, 4, D], per-token dgate, dm
    _, dy, sums, dgate, dm, _ = _launch_bwd(dh, None, None, y, gate, m, None, 0.0, False, False, m_start, m_end)
    return dy, sums, dgate, dm


@triton_op("paretoslider::gated_residual_modulate_bwd", mutates_args=())
def _gated_residual_modulate_bwd_op(
    dh: Optional[Tensor],
    dx_mod: Tensor,
    h: Tensor,
    y: Tensor,
    gate: Tensor,
    m: Optional[Tensor],
    scale: Tensor,
    eps: float,
    rms: bool,
    shift_per_token: bool,
    m_start: int,
    m_end: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # -> dx, dy, token sums [B, 4, D], per-token dgate, dm, dscale
    return _launch_bwd(dh, dx_mod, h, y, gate, m, scale, eps, rms, shift_per_token, m_start, m_end)


def _cond_grads(sums, dgate_tok, dm_tok, gate, m):
    # sums [B, 4, D]: token sums for [B, D] conditioning; *_tok: gradients of [B, T, D] conditioning -> dgate, dm
    dgate = dgate_tok if gate.dim() == 3 else sums[:, 0].to(gate.dtype)
    if m is None:
        dm = None
    elif m.dim() == 3:
        dm = dm_tok
    elif gate.dim() == 3:  # the kernel summed gate * dh
        dm = sums[:, 1].to(m.dtype)
    else:
        dm = (gate.to(sums.dtype) * sums[:, 1]).to(m.dtype)
    return dgate, dm


def _setup_residual(ctx, inputs, output):
    x, gate, y, m, m_start, m_end = inputs
    ctx.save_for_backward(y, gate, m)
    ctx.x_dtype, ctx.m_range = x.dtype, (m_start, m_end)


def _backward_residual(ctx, dh):
    y, gate, m = ctx.saved_tensors
    dy, sums, dgate_tok, dm_tok = torch.ops.paretoslider.gated_residual_bwd(dh, y, gate, m, *ctx.m_range)
    dgate, dm = _cond_grads(sums, dgate_tok, dm_tok, gate, m)
    return dh.to(ctx.x_dtype), dgate, dy, dm, None, None


def _setup_fused(ctx, inputs, output):
    x, gate, y, shift, scale, eps, rms, m, m_start, m_end = inputs
    ctx.save_for_backward(output[0], y, gate, m, scale)  # h is an output: saving it costs nothing
    ctx.eps, ctx.rms, ctx.m_range = eps, rms, (m_start, m_end)
    ctx.shift_dtype, ctx.shift_per_token = shift.dtype, shift.dim() == 3


def _backward_fused(ctx, dh, dx_mod):
    h, y, gate, m, scale = ctx.saved_tensors
    if dx_mod is None:  # only h was used downstream
        dx_mod = torch.zeros_like(h)
    dx, dy, sums, dgate_tok, dm_tok, dscale_tok = torch.ops.paretoslider.gated_residual_modulate_bwd(
        dh, dx_mod, h, y, gate, m, scale, ctx.eps, ctx.rms, ctx.shift_per_token, *ctx.m_range
    )
    dgate, dm = _cond_grads(sums, dgate_tok, dm_tok, gate, m)
    dshift = (dx_mod if ctx.shift_per_token else sums[:, 2]).to(ctx.shift_dtype)  # d(x_mod)/d(shift) = 1
    dscale = dscale_tok if scale.dim() == 3 else sums[:, 3].to(scale.dtype)
    return dx, dgate, dy, dshift, dscale, None, None, dm, None, None


_gated_residual_op.register_autograd(_backward_residual, setup_context=_setup_residual)
_gated_residual_modulate_op.register_autograd(_backward_fused, setup_context=_setup_fused)

# ----------------------------------------------------------------------------------------------------------
# Public functions


def _fused_dtypes(x, gate, y, m):
    # The kernels write h in x's dtype; mixed dtypes (where torch would promote) take the reference.
    return x.dtype == y.dtype == gate.dtype and (m is None or m.dtype == x.dtype)


def gated_residual(x, gate, y, m=None, m_range=None):
    # x, y [B, T, D]; gate, m [B, D] or [B, T, D] (leading 1: shared by the batch); m_range (start, end):
    # m on those tokens only
    start, end = check_residual(x, gate, y, m, m_range)
    if not (use_triton(x) and _fused_dtypes(x, gate, y, m)):
        return gated_residual_ref(x, gate, y, m, m_range)
    return torch.ops.paretoslider.gated_residual(x, cond_view(gate, x), y, cond_view(m, x), start, end)


def gated_residual_modulate(x, gate, y, shift, scale, eps=1e-6, rms=False, m=None, m_range=None):
    # -> (h, x_mod): the new residual stream and the modulated input of the next sub-layer
    start, end = check_residual(x, gate, y, m, m_range)
    check_modulate(x, shift, scale)
    if not (use_triton(x) and _fused_dtypes(x, gate, y, m)):
        return gated_residual_modulate_ref(x, gate, y, shift, scale, eps, rms, m, m_range)
    return torch.ops.paretoslider.gated_residual_modulate(
        x,
        cond_view(gate, x),
        y,
        cond_view(shift, x),
        cond_view(scale, x),
        float(eps),
        bool(rms),
        cond_view(m, x),
        start,
        end,
    )

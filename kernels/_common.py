"""What the kernel files share: Triton (or a stand-in when it is absent), the backend switch, launch sizes."""

import os

import torch
from torch.library import wrap_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS: the @triton.jit definitions still import, the "torch" backend runs the references
    HAS_TRITON = False

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

# The interpreter runs the kernels on CPU tensors with numpy, one program instance after another (tests only).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ----------------------------------------------------------------------------------------------------------
# Backend switch: "triton" runs the fused kernels, "torch" the plain references next to them.

_backend = "triton" if HAS_TRITON and (torch.cuda.is_available() or INTERPRET) else "torch"


def set_backend(name):
    global _backend
    if name not in ("triton", "torch"):
        raise ValueError(f"kernels backend must be 'triton' or 'torch', got {name!r}")
    if name == "triton" and not (HAS_TRITON and (torch.cuda.is_available() or INTERPRET)):
        raise RuntimeError("the triton kernels need Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    _backend = name


def get_backend():
    return _backend


def use_triton(x):
    # Per call: even with the "triton" backend, CPU tensors on a CUDA machine (a tiny model) take the reference.
    return _backend == "triton" and (x.is_cuda or INTERPRET) and x.numel() > 0


# ----------------------------------------------------------------------------------------------------------
# Launch sizes. A program handles `rows` consecutive rows of one [*, D] slab, BLOCK_M rows at a time; the
# row count is a runtime int, so a new resolution (T) never triggers a recompile.

# Tests set this to (BLOCK_M, rows) to force many small programs with ragged tails on tiny shapes.
FORCE_ROWS = None


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def row_tiling(n_rows, n_slabs, width, device, backward, tile=4096):
    """Tile [BLOCK_M, BLOCK_D], rows per program, programs per slab and warps, for `n_slabs` slabs (samples)
    of `n_rows` rows of `width` elements.

    Forward: one tile per program; many small programs hide memory latency best. Backward: about one wave of
    programs (~32 resident warps per SM), each looping over its rows and keeping fp32 partial sums of the token
    reductions (dscale, dgate, dweight) in registers; at least 8 rows each, so the partial buffers written
    and re-read stay small next to the activations.
    """
    BLOCK_D = triton.next_power_of_2(width)
    if INTERPRET:
        tile = 16384  # the interpreter pays per op and per program, not per element: big tiles, few programs
    BLOCK_M = min(max(1, tile // BLOCK_D), triton.next_power_of_2(n_rows))
    # ~8 elements of a tile per thread: <= 128 registers and (next to) no spills on sm_90 for every launch
    # at the real shapes (python kernels/bench.py --ptx); not tuned on a GPU yet.
    num_warps = min(16, max(1, BLOCK_M * BLOCK_D // 256))
    if INTERPRET:
        rows = n_rows
    elif backward:
        programs = _sm_count(device) * max(1, 32 // num_warps)
        rows = max(8, triton.cdiv(n_rows * n_slabs, programs))
    else:
        rows = BLOCK_M
    if FORCE_ROWS is not None:
        BLOCK_M, rows = FORCE_ROWS
    rows = triton.cdiv(rows, BLOCK_M) * BLOCK_M
    return BLOCK_M, BLOCK_D, rows, triton.cdiv(n_rows, rows), num_warps


def launcher(kernel):
    # wrap_triton lets torch.compile trace the launch inside a torch.library.triton_op. Interpreted kernels cannot
    # be traced (and older torch releases refuse them), so the interpreter launches them directly.
    return kernel if INTERPRET else wrap_triton(kernel)


def rowwise(t):
    # [B, D] conditioning vectors (shift, scale, gate, m) are read through a row stride; columns must be dense.
    # Views from .chunk(6, dim=1) of the adaLN output are, so this copies nothing in the model.
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Conditioning tensors (shift, scale, gate, m) of x [B, T, D] are [B, D], one vector per sample broadcast over
# the tokens, or [B, T, D], one per token (LTX-2: a timestep per token). A leading 1 is shared by the batch.
# Both backends call the checks below first, so they accept and refuse the same shapes (the kernels would
# otherwise read out of bounds, silently under the interpreter).


def check_tokens(x):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got {tuple(x.shape)}")


def check_like(name, t, x):
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def check_cond(name, v, x):
    B, T, D = x.shape
    if not (v.dim() in (2, 3) and v.shape[0] in (1, B) and v.shape[1:] == x.shape[1 if v.dim() == 3 else 2 :]):
        raise ValueError(f"{name} must be [B, D] or [B, T, D] for x {tuple(x.shape)}, got {tuple(v.shape)}")


def slider_range(m_range, T):
    # m_range (start, end): the tokens the slider vector m is added to (FLUX single-stream: the image tokens
    # after the text); None: all of them
    if m_range is None:
        return 0, T
    start, end = m_range
    if not 0 <= start <= end <= T:
        raise ValueError(f"m_range must satisfy 0 <= start <= end <= T = {T}, got {tuple(m_range)}")
    return int(start), int(end)


def per_token(v):
    # the reference's broadcast of a conditioning tensor against [B, T, D]
    return v[:, None] if v.dim() == 2 else v


def cond_view(v, x):
    # [1 or B, D] -> [B, D], [1 or B, T, D] -> [B, T, D]: stride-0 where shared, columns dense, no copy for
    # .chunk views of the adaLN output
    if v is None:
        return None
    return rowwise(v.expand(x.shape[0], x.shape[2]) if v.dim() == 2 else v.expand(x.shape))


def cond_strides(v):
    # (sample, token) strides of a conditioning view; the token stride of a [B, D] vector is never read
    return (v.stride(0), v.stride(1) if v.dim() == 3 else 0) if v is not None else (0, 0)


@triton.jit
def _up(x):
    # Upcast a loaded tile before any arithmetic: bf16 math is wrong under the interpreter (numpy works on the
    # raw bits) and imprecise on GPUs. fp64 stays fp64 so gradcheck sees real double precision.
    if x.dtype == tl.float64:
        return x
    return x.to(tl.float32)


@triton.jit
def _sample_vector(P, b, stride, cols, cmask):
    # the [D] conditioning vector of sample b (shift, scale, gate, m: one row of a [B, D] view), upcast
    return _up(tl.load(P + b * stride + cols, mask=cmask, other=0.0))


@triton.jit
def _token_tile(b, t, T, D, cols, cmask):
    # tokens t of sample b in a contiguous [B, T, D] tensor -> (mask, element offsets) of the [BLOCK_M, BLOCK_D] tile
    mask = (t < T)[:, None] & cmask[None, :]
    return mask, (b * T + t).to(tl.int64)[:, None] * D + cols[None, :]


@triton.jit
def _cond_vector(P, b, stride, cols, cmask, PER_TOKEN: tl.constexpr):
    # before the token loop: a [B, D] conditioning tensor's vector for sample b; a [B, T, D] one is read per tile
    if PER_TOKEN:
        return 0.0  # placeholder, never read
    else:
        return _sample_vector(P, b, stride, cols, cmask)


@triton.jit
def _cond_tile(P, vec, b, t, s_b, s_t, cols, mask, PER_TOKEN: tl.constexpr):
    # a conditioning tensor at tokens t of sample b -> [BLOCK_M, BLOCK_D] tile ([1, BLOCK_D] for a [B, D] one)
    if PER_TOKEN:
        row = b.to(tl.int64) * s_b + t.to(tl.int64) * s_t
        return _up(tl.load(P + row[:, None] + cols[None, :], mask=mask, other=0.0))
    else:
        return vec[None, :]


@triton.jit
def _cond_grad(acc, g, DP, offs, mask, PER_TOKEN: tl.constexpr):
    # g [BLOCK_M, BLOCK_D]: the gradient of a conditioning tensor at this tile's tokens. [B, T, D]: stored per
    # token (DP, contiguous like x). [B, D]: added to the program's fp32 partial sums (acc, summed over rows later)
    if PER_TOKEN:
        tl.store(DP + offs, g.to(DP.dtype.element_ty), mask=mask)
        return acc
    else:
        return acc + g


@triton.jit
def _acc_zeros(P, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # partial sums of the token reductions, in P's upcast dtype (fp32, or fp64 for gradcheck)
    return _up(tl.zeros([BLOCK_M, BLOCK_D], dtype=P.dtype.element_ty))

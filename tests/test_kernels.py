"""kernels/: the Triton kernels (run by the interpreter on CPU) against independent fp64 references.

Every public function is checked forward and for every gradient, in fp32 (tight) and bf16 (one bf16 rounding),
on odd shapes (D not a power of two, ragged row tiles, several programs per sample), with the inputs the model
really passes (strided views of the adaLN and qkv outputs, stride-0 gradients from .sum()), and by fp64
gradcheck of each torch.library op; in every mode: [B, D] or per-token [B, T, D] conditioning, the slider on a
token range, qk weights per head [Dh] or across heads [H * Dh], interleaved or split RoPE with broadcast tables.
Both backends refuse the same bad shapes. The model test runs the tiny SD3.5 with kernels on and off.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/ (and Triton) are imported: the kernels run on CPU

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import _common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests/conftest.py sets TRITON_INTERPRET=1 before anything imports kernels/ (Triton fixes the mode when a kernel
# is defined) and leaves the other test modules on the references; the tests here switch the kernels on.
assert _common.INTERPRET, "kernels/ was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"


@pytest.fixture(autouse=True)
def _triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend("torch")
    _common.FORCE_ROWS = None


# ----------------------------------------------------------------------------------------------------------
# Independent fp64 references: written from the formulas, not from kernels/*_ref.


def norm64(x, eps=1e-6, rms=False):
    x = x.double()
    if not rms:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def tok64(v):
    # conditioning against [B, T, D]: a [B, D] vector is the same for every token
    return v.double()[:, None] if v.dim() == 2 else v.double()


def modulate64(x, shift, scale, eps=1e-6, rms=False):
    return norm64(x, eps, rms) * (1 + tok64(scale)) + tok64(shift)


def residual64(x, gate, y, m=None, m_range=None):
    y = y.double()
    if m is not None:
        start, end = m_range or (0, y.shape[1])
        on = ((torch.arange(y.shape[1]) >= start) & (torch.arange(y.shape[1]) < end)).double()[:, None]
        y = y + tok64(m) * on  # m on the tokens start..end-1 only
    return x.double() + tok64(gate) * y


def residual_modulate64(x, gate, y, shift, scale, eps=1e-6, rms=False, m=None, h_stored=None, m_range=None):
    # h is stored in x's dtype, then normalised. h_stored: the kernel's own h (checked on its own against h64),
    # so the norm sees the same rounding (the interpreter truncates to bf16 where torch rounds to nearest).
    h = residual64(x, gate, y, m, m_range)
    rounded = h.to(x.dtype).double() if h_stored is None else h_stored.double()
    h = h + (rounded - h).detach()
    return h, modulate64(h, shift, scale, eps, rms)


def rope64(t, cos, sin, interleaved):
    # rotation of channel pairs as a complex product: (a + ib) * (cos + i sin)
    rot = torch.complex(cos.double(), sin.double())
    if interleaved:
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous()) * rot
        return torch.view_as_real(z).flatten(-2)
    a, b = t.chunk(2, -1)
    z = torch.complex(a, b) * rot
    return torch.cat([z.real, z.imag], -1)


def qk64(q, k, qw, kw, cos=None, sin=None, eps=1e-6, interleaved=True):
    # weights [Dh]: RMS over each head; [H * Dh]: over all features of the token, then RoPE per head
    out = []
    for t, w in ((q, qw), (k, kw)):
        if w.numel() == t.shape[-1]:
            t = norm64(t, eps, rms=True) * w.double()
        else:
            t = (norm64(t.flatten(-2), eps, rms=True) * w.double()).view(t.shape)
        out.append(t if cos is None else rope64(t, cos, sin, interleaved))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Harness: run f on fresh leaves, backprop fixed random weights (or .sum(): stride-0 grads), collect all


def run(f, leaves, dtype, weights=None):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    outs = f(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if weights is None:  # .sum() hands the backward expanded, stride-0 gradients
        loss = sum(o.sum() for o in outs)
    else:
        loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items()}


def compare(f, f64, leaves, n_out, dtype=torch.float32, sum_loss=False, atol=2e-5, rtol=2e-5):
    gen = torch.Generator().manual_seed(1)
    probe, _ = run(f64, leaves, torch.float64, None)
    weights = None if sum_loss else [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in probe]
    if dtype == torch.bfloat16:  # the reference sees the very same bf16 inputs and upstream gradients
        leaves = {k: v.to(dtype) for k, v in leaves.items()}
        weights = None if weights is None else [w.to(dtype) for w in weights]
    outs, grads = run(f, leaves, dtype, weights)
    outs64, grads64 = run(f64, leaves, torch.float64, weights)
    assert len(outs) == n_out
    pairs = [(f"out{i}", a, b) for i, (a, b) in enumerate(zip(outs, outs64))]
    pairs += [(f"d{k}", grads[k], grads64[k]) for k in leaves]
    for name, got, ref in pairs:
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == dtype and got.shape == ref.shape, name
        got = got.double()
        if dtype == torch.bfloat16:
            # fp32 math and a single rounding to bf16: within one bf16 ulp (2^-7 relative) of the exact value.
            # (Half an ulp on a GPU, which rounds to nearest; the interpreter truncates.)
            bound = 2.0**-7 * ref.abs() * 1.01 + 1e-5 * (1 + ref.abs().max())
            worst = ((got - ref).abs() / bound).max().item()
            assert worst <= 1, f"{name}: error {worst:.2f}x the bf16 rounding bound"
        else:
            torch.testing.assert_close(got, ref, atol=atol * (1 + ref.abs().max().item()), rtol=rtol, msg=name)


# The model passes the adaLN output split with .chunk(6, dim=1): strided [B, D] views, columns dense. Per-token
# conditioning [B, T, 6D] (LTX-2: table + temb.view(B, T, 6, D), unbound) splits into strided [B, T, D] views.
def chunked(cond, i, n=6):
    return cond.chunk(n, dim=-1)[i]


SHAPES = [(2, 7, 48), (1, 5, 123), (5, 123, 123), (2, 16, 64)]
SMALL = [(2, 7, 48), (1, 5, 123)]
FORCE = [None, (2, 4)]  # auto tiling; 2-row tiles, 4 rows per program: several programs per sample, ragged tails


def _force(f):
    _common.FORCE_ROWS = f


# ----------------------------------------------------------------------------------------------------------
# modulate


def _mod_leaves(B, T, D, seed=0, per_token=False):
    # per_token: the conditioning is [B, T, 6D] (one adaLN output per token)
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, *((T,) if per_token else ()), 6 * D, generator=g) * 0.5
    return dict(x=torch.randn(B, T, D, generator=g) * 2 + 0.5, cond=cond)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_modulate(shape, rms):
    f = lambda x, cond: kernels.modulate(x, chunked(cond, 0), chunked(cond, 1), 1e-6, rms)
    f64 = lambda x, cond: modulate64(x, chunked(cond, 0), chunked(cond, 1), 1e-6, rms)
    compare(f, f64, _mod_leaves(*shape), 1)


@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("shape", SMALL + [(3, 13, 40)])
def test_modulate_tiling_and_stride0(shape, force):
    _force(force)
    f = lambda x, cond: kernels.modulate(x, chunked(cond, 3), chunked(cond, 4), 1e-5, False)
    f64 = lambda x, cond: modulate64(x, chunked(cond, 3), chunked(cond, 4), 1e-5, False)
    compare(f, f64, _mod_leaves(*shape), 1, sum_loss=True)


@pytest.mark.parametrize("rms", [False, True])
def test_modulate_bf16(rms):
    f = lambda x, cond: kernels.modulate(x, chunked(cond, 0), chunked(cond, 1), 1e-6, rms)
    f64 = lambda x, cond: modulate64(x, chunked(cond, 0), chunked(cond, 1), 1e-6, rms)
    compare(f, f64, _mod_leaves(3, 37, 96), 1, dtype=torch.bfloat16)


def test_modulate_broadcast_and_noncontiguous_x():
    # shift/scale [1, D] shared by the batch; x a transposed view [T, B, D] -> [B, T, D]
    g = torch.Generator().manual_seed(3)
    leaves = dict(
        xt=torch.randn(9, 3, 40, generator=g),
        shift=torch.randn(1, 40, generator=g),
        scale=torch.randn(1, 40, generator=g),
    )
    f = lambda xt, shift, scale: kernels.modulate(xt.transpose(0, 1), shift, scale)
    f64 = lambda xt, shift, scale: modulate64(xt.transpose(0, 1), shift.expand(3, 40), scale.expand(3, 40))
    compare(f, f64, leaves, 1)


def test_modulate_reference_matches_fp64():
    # the "torch" backend (kernels.modulate_ref) is held to the same fp64 formulas
    leaves = _mod_leaves(2, 7, 48)
    f = lambda x, cond: kernels.modulate_ref(x, chunked(cond, 0), chunked(cond, 1), 1e-6, True)
    f64 = lambda x, cond: modulate64(x, chunked(cond, 0), chunked(cond, 1), 1e-6, True)
    compare(f, f64, leaves, 1)


# ----------------------------------------------------------------------------------------------------------
# gated residual, plain and slider form


def _res_leaves(B, T, D, slider, seed=0, per_token=False, m_per_token=False):
    g = torch.Generator().manual_seed(seed)
    leaves = dict(
        x=torch.randn(B, T, D, generator=g),
        y=torch.randn(B, T, D, generator=g) * 3,
        cond=torch.randn(B, *((T,) if per_token else ()), 6 * D, generator=g),
    )
    if slider:
        leaves["m"] = torch.randn(B, *((T,) if m_per_token else ()), D, generator=g)
    return leaves


@pytest.mark.parametrize("slider", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(shape, slider):
    f = lambda x, y, cond, m=None: kernels.gated_residual(x, chunked(cond, 2), y, m)
    f64 = lambda x, y, cond, m=None: residual64(x, chunked(cond, 2), y, m)
    compare(f, f64, _res_leaves(*shape, slider), 1)


@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("slider", [False, True])
def test_gated_residual_tiling_stride0_bf16(slider, force):
    _force(force)
    f = lambda x, y, cond, m=None: kernels.gated_residual(x, chunked(cond, 5), y, m)
    f64 = lambda x, y, cond, m=None: residual64(x, chunked(cond, 5), y, m)
    compare(f, f64, _res_leaves(3, 13, 40, slider), 1, sum_loss=True)
    compare(f, f64, _res_leaves(2, 11, 96, slider, seed=1), 1, dtype=torch.bfloat16)


def test_gated_residual_shared_slider_vector():
    # m [1, D]: one slider vector for the whole batch; its gradient sums over samples
    leaves = _res_leaves(3, 5, 24, True)
    leaves["m"] = leaves["m"][:1]
    f = lambda x, y, cond, m: kernels.gated_residual(x, chunked(cond, 2), y, m)
    f64 = lambda x, y, cond, m: residual64(x, chunked(cond, 2), y, m.expand(3, 24))
    compare(f, f64, leaves, 1)


# ----------------------------------------------------------------------------------------------------------
# fused gated residual -> norm -> modulate (two outputs)


def _fused(rms, slider):
    stored = {}

    def f(x, y, cond, m=None):
        h, x_mod = kernels.gated_residual_modulate(
            x, chunked(cond, 2), y, chunked(cond, 3), chunked(cond, 4), 1e-6, rms, m
        )
        stored["h"] = h.detach()
        return h, x_mod

    def f64(x, y, cond, m=None):
        return residual_modulate64(
            x, chunked(cond, 2), y, chunked(cond, 3), chunked(cond, 4), 1e-6, rms, m, stored.get("h")
        )

    return f, f64


@pytest.mark.parametrize("slider", [False, True])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gated_residual_modulate(shape, rms, slider):
    compare(*_fused(rms, slider), _res_leaves(*shape, slider), 2)


@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("rms", [False, True])
def test_gated_residual_modulate_tiling_stride0_bf16(rms, force):
    _force(force)
    compare(*_fused(rms, True), _res_leaves(3, 13, 40, True), 2, sum_loss=True)
    compare(*_fused(rms, True), _res_leaves(2, 11, 96, True, seed=1), 2, dtype=torch.bfloat16)


@pytest.mark.parametrize("used", [0, 1])
def test_gated_residual_modulate_one_output_used(used):
    # the last block uses only h (or a caller only x_mod): the other output's gradient is None in backward
    f, f64 = _fused(False, True)
    compare(lambda **kw: f(**kw)[used], lambda **kw: f64(**kw)[used], _res_leaves(2, 7, 48, True), 1)


def test_gated_residual_modulate_equals_composition():
    # same numbers as gated_residual then modulate through the kernels, in bf16 (h rounded before the norm)
    x, y, cond, m = _res_leaves(2, 9, 40, True).values()
    x, y, cond, m = x.bfloat16(), y.bfloat16(), cond.bfloat16(), m.bfloat16()
    h, x_mod = kernels.gated_residual_modulate(x, cond[:, :40], y, cond[:, 40:80], cond[:, 80:120], m=m)
    h2 = kernels.gated_residual(x, cond[:, :40], y, m)
    assert torch.equal(h, h2)
    torch.testing.assert_close(x_mod, kernels.modulate(h2, cond[:, 40:80], cond[:, 80:120]), atol=0, rtol=2**-7)


# ----------------------------------------------------------------------------------------------------------
# qk RMSNorm + RoPE


def _qk_leaves(B, L, H, Dh, rope, cos_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = dict(
        qkv=torch.randn(B, L, 3, H, Dh, generator=g) * 2,
        qw=torch.rand(Dh, generator=g) + 0.5,
        kw=torch.rand(Dh, generator=g) + 0.5,
    )
    if rope != "none":
        shape = {"per_token": (1, L, 1, Dh // 2), "per_sample": (B, L, 1, Dh // 2), "full": (B, L, H, Dh // 2)}
        leaves["theta"] = torch.rand(shape[cos_shape], generator=g) * 6.3
    return leaves


def _qk(rope):
    inter = rope == "interleaved"

    def f(qkv, qw, kw, theta=None):
        q, k, _ = qkv.unbind(2)  # strided views of the fused projection, as in the model
        cs = (None, None) if theta is None else (theta.cos().detach(), theta.sin().detach())
        return kernels.qk_norm_rope(q, k, qw, kw, *cs, eps=1e-6, interleaved=inter)

    def f64(qkv, qw, kw, theta=None):
        q, k, _ = qkv.unbind(2)
        cs = (None, None) if theta is None else (theta.cos().detach(), theta.sin().detach())
        return qk64(q, k, qw, kw, *cs, eps=1e-6, interleaved=inter)

    return f, f64


def _qk_compare(leaves, rope, **kw):
    f, f64 = _qk(rope)
    theta = leaves.pop("theta", None)
    if theta is not None:  # a constant table: not a leaf that wants a gradient
        g, g64 = f, f64
        f = lambda **k: g(**k, theta=theta)
        f64 = lambda **k: g64(**k, theta=theta)
    compare(f, f64, leaves, 2, **kw)


@pytest.mark.parametrize("rope", ["none", "interleaved", "split"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 7, 2, 24), (2, 33, 4, 64), (1, 9, 2, 128)])
def test_qk_norm_rope(shape, rope):
    _qk_compare(_qk_leaves(*shape, rope, "per_sample"), rope)


@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("cos_shape", ["per_token", "full"])
@pytest.mark.parametrize("rope", ["interleaved", "split"])
def test_qk_norm_rope_tiling_broadcast_stride0(rope, cos_shape, force):
    _force(force)
    _qk_compare(_qk_leaves(2, 5, 3, 24, rope, cos_shape), rope, sum_loss=True)


@pytest.mark.parametrize("rope", ["none", "interleaved", "split"])
def test_qk_norm_rope_bf16(rope):
    _qk_compare(_qk_leaves(2, 11, 3, 64, rope, "per_sample"), rope, dtype=torch.bfloat16)


def test_qk_norm_rope_outputs_contiguous_and_q_k_lengths_differ():
    # cross-attention shapes (no RoPE): q and k with different token counts, each launched on its own
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g).transpose(1, 2)
    qw, kw = torch.rand(16, generator=g), torch.rand(16, generator=g)
    oq, ok = kernels.qk_norm_rope(q, k, qw, kw)
    rq, rk = qk64(q, k, qw, kw)
    assert oq.is_contiguous() and ok.is_contiguous() and ok.shape == (2, 9, 3, 16)
    torch.testing.assert_close(oq.double(), rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok.double(), rk, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# New modes: per-token conditioning [B, T, D] (LTX-2), the slider on a token range (FLUX single-stream),
# qk norm across all heads [H * Dh] (LTX-2). The references ("torch" backend) are held to the same formulas.

BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 5, 123), (2, 123, 123)])
def test_modulate_per_token(shape, rms, backend):
    kernels.set_backend(backend)
    f = lambda x, cond: kernels.modulate(x, chunked(cond, 0), chunked(cond, 1), 1e-6, rms)
    f64 = lambda x, cond: modulate64(x, chunked(cond, 0), chunked(cond, 1), 1e-6, rms)
    compare(f, f64, _mod_leaves(*shape, per_token=True), 1)


@pytest.mark.parametrize("per_token", ["shift", "scale"])
def test_modulate_mixed_and_shared_per_token(per_token):
    # one of shift/scale per token ([1, T, D]: shared by the batch, its gradient sums over samples), the other
    # per sample
    g = torch.Generator().manual_seed(2)
    leaves = dict(
        x=torch.randn(3, 9, 40, generator=g),
        c_tok=torch.randn(1, 9, 40, generator=g),
        c_vec=torch.randn(3, 40, generator=g),
    )

    def args(c_tok, c_vec):
        return (c_tok, c_vec) if per_token == "shift" else (c_vec, c_tok)

    f = lambda x, c_tok, c_vec: kernels.modulate(x, *args(c_tok, c_vec), 1e-6, True)
    f64 = lambda x, c_tok, c_vec: modulate64(x, *args(c_tok.expand(3, 9, 40), c_vec), 1e-6, True)
    compare(f, f64, leaves, 1)


@pytest.mark.parametrize("force", FORCE)
def test_modulate_per_token_tiling_stride0_bf16(force):
    _force(force)
    f = lambda x, cond: kernels.modulate(x, chunked(cond, 3), chunked(cond, 4), 1e-5, False)
    f64 = lambda x, cond: modulate64(x, chunked(cond, 3), chunked(cond, 4), 1e-5, False)
    compare(f, f64, _mod_leaves(3, 13, 40, per_token=True), 1, sum_loss=True)
    compare(f, f64, _mod_leaves(2, 11, 96, seed=1, per_token=True), 1, dtype=torch.bfloat16)


# gate per sample or per token; m none, per sample or per token; m_range on edge and ragged token ranges
SLIDERS = [
    ("none", None),
    ("sample", None),
    ("sample", (0, 0)),
    ("sample", (2, 5)),
    ("sample", (4, 7)),
    ("token", (1, 6)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slider, m_range", SLIDERS)
@pytest.mark.parametrize("gate", ["sample", "token"])
def test_gated_residual_per_token_and_m_range(gate, slider, m_range, backend):
    kernels.set_backend(backend)
    f = lambda x, y, cond, m=None: kernels.gated_residual(x, chunked(cond, 2), y, m, m_range)
    f64 = lambda x, y, cond, m=None: residual64(x, chunked(cond, 2), y, m, m_range)
    leaves = _res_leaves(2, 7, 48, slider != "none", per_token=gate == "token", m_per_token=slider == "token")
    compare(f, f64, leaves, 1)


@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("gate", ["sample", "token"])
def test_gated_residual_m_range_tiling_stride0_bf16(gate, force):
    # text tokens 0..4 then image tokens: the range starts inside a program's tile and its rows
    _force(force)
    f = lambda x, y, cond, m: kernels.gated_residual(x, chunked(cond, 5), y, m, (5, 13))
    f64 = lambda x, y, cond, m: residual64(x, chunked(cond, 5), y, m, (5, 13))
    compare(f, f64, _res_leaves(3, 13, 40, True, per_token=gate == "token"), 1, sum_loss=True)
    compare(f, f64, _res_leaves(2, 13, 96, True, seed=1, per_token=gate == "token"), 1, dtype=torch.bfloat16)


def test_gated_residual_odd_shape_per_token_m_range():
    f = lambda x, y, cond, m: kernels.gated_residual(x, chunked(cond, 2), y, m, (23, 123))
    f64 = lambda x, y, cond, m: residual64(x, chunked(cond, 2), y, m, (23, 123))
    compare(f, f64, _res_leaves(2, 123, 123, True, per_token=True), 1)


def _fused_modes(rms, gate, cond_mod, m_range):
    # gate from `gate` ([B, 6D] or [B, T, 6D] cond), shift/scale from cond_mod
    stored = {}
    pick = lambda kw: (chunked(kw[gate], 2), chunked(kw[cond_mod], 3), chunked(kw[cond_mod], 4))

    def f(x, y, m, **kw):
        g, shift, scale = pick(kw)
        h, x_mod = kernels.gated_residual_modulate(x, g, y, shift, scale, 1e-6, rms, m, m_range)
        stored["h"] = h.detach()
        return h, x_mod

    def f64(x, y, m, **kw):
        g, shift, scale = pick(kw)
        return residual_modulate64(x, g, y, shift, scale, 1e-6, rms, m, stored.get("h"), m_range)

    return f, f64


def _fused_leaves(B, T, D, gate, cond_mod, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = _res_leaves(B, T, D, True, seed=seed)
    del leaves["cond"]
    for name in {gate, cond_mod}:
        leaves[name] = torch.randn(B, *((T,) if name == "tcond" else ()), 6 * D, generator=g)
    return leaves


# (gate, shift/scale): all per token, or a per-token gate with per-sample shift/scale, and the reverse
FUSED_MODES = [("tcond", "tcond"), ("tcond", "cond"), ("cond", "tcond")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate, cond_mod", FUSED_MODES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape, m_range", [((2, 7, 48), None), ((1, 9, 123), (3, 8))])
def test_gated_residual_modulate_per_token_and_m_range(shape, m_range, rms, gate, cond_mod, backend):
    kernels.set_backend(backend)
    compare(*_fused_modes(rms, gate, cond_mod, m_range), _fused_leaves(*shape, gate, cond_mod), 2)


@pytest.mark.parametrize("force", FORCE)
def test_gated_residual_modulate_per_token_tiling_stride0_bf16(force):
    _force(force)
    compare(
        *_fused_modes(True, "tcond", "tcond", (2, 11)), _fused_leaves(3, 13, 40, "tcond", "tcond"), 2, sum_loss=True
    )
    compare(
        *_fused_modes(False, "tcond", "cond", (5, 11)),
        _fused_leaves(2, 11, 96, "tcond", "cond", seed=1),
        2,
        dtype=torch.bfloat16,
    )


def test_gated_residual_modulate_per_token_slider():
    # m [B, T, D] too (one slider vector per token), on a token range
    f, f64 = _fused_modes(True, "tcond", "cond", (2, 6))
    leaves = _fused_leaves(2, 7, 48, "tcond", "cond")
    leaves["m"] = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(9))
    compare(f, f64, leaves, 2)


@pytest.mark.parametrize("per_token", [False, True])
def test_modulate_fp32_conditioning_bf16_x(per_token):
    # the adaLN output in fp32, activations in bf16: x_mod and dx in bf16, dshift/dscale in fp32, as the reference
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 40, generator=g).bfloat16()
    cond = torch.randn(2, *((9,) if per_token else ()), 80, generator=g) * 0.5
    dy = torch.randn(2, 9, 40, generator=g).bfloat16()
    res = {}
    for backend in BACKENDS:
        kernels.set_backend(backend)
        xl, cl = x.clone().requires_grad_(), cond.clone().requires_grad_()
        out = kernels.modulate(xl, cl[..., :40], cl[..., 40:], 1e-6, True)
        out.backward(dy)
        res[backend] = out, xl.grad, cl.grad
    for got, ref in zip(res["triton"], res["torch"]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(
            got.float(), ref.float(), atol=1e-2 if got.dtype == torch.bfloat16 else 1e-4, rtol=2**-7
        )


@pytest.mark.parametrize("used", [0, 1])
def test_gated_residual_modulate_per_token_one_output_used(used):
    f, f64 = _fused_modes(False, "tcond", "tcond", (1, 5))
    compare(lambda **kw: f(**kw)[used], lambda **kw: f64(**kw)[used], _fused_leaves(2, 7, 48, "tcond", "tcond"), 1)


def _qk_weights(leaves, H, across):
    # across: "q", "k" or "qk": those weights are [H * Dh] (norm over all heads of a token)
    g = torch.Generator().manual_seed(7)
    for name in ("qw", "kw"):
        if name[0] in across:
            leaves[name] = torch.rand(H * leaves[name].numel(), generator=g) + 0.5
    return leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", ["none", "interleaved", "split"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 7, 2, 24), (2, 9, 4, 32)])
def test_qk_norm_rope_across_heads(shape, rope, backend):
    kernels.set_backend(backend)
    _qk_compare(_qk_weights(_qk_leaves(*shape, rope, "full"), shape[2], "qk"), rope)


@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("rope", ["interleaved", "split"])
def test_qk_norm_rope_across_heads_tiling_stride0(rope, force):
    # q normalised per head, k across heads, in one call; a per-token table
    _force(force)
    _qk_compare(_qk_weights(_qk_leaves(2, 5, 3, 24, rope, "per_token"), 3, "k"), rope, sum_loss=True)


@pytest.mark.parametrize("rope", ["interleaved", "split"])
def test_qk_norm_rope_across_heads_bf16(rope):
    _qk_compare(_qk_weights(_qk_leaves(2, 11, 4, 64, rope, "full"), 4, "qk"), rope, dtype=torch.bfloat16)


def _tables(kind, B, L, H, half, g):
    # -> cos, sin as passed; and as [B, L, H, half] for the fp64 reference
    theta = torch.rand(B, L, H, half, generator=g, dtype=torch.float64) * 6.3
    if kind == "[L, half]":  # the usual position table: one row per token
        view, full = (lambda t: t[0, :, 0]), (lambda t: t[0, :, 0][None, :, None].expand(B, L, H, half))
    elif kind == "[B, L, 1, half]":
        view = lambda t: t[:, :, :1]
        full = lambda t: view(t).expand(B, L, H, half)
    elif kind == "[1, L, H, half]":
        view = lambda t: t[:1]
        full = lambda t: view(t).expand(B, L, H, half)
    elif kind == "heads-major view":  # LTX-2 split: a [B, H, L, half] table per head, seen transposed
        view = full = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
    else:  # "stride-0 expand": a [1, L, 1, half] table expanded, strides (0, half, 0, 1)
        view = full = lambda t: t[:1, :, :1].expand(B, L, H, half)
    return view(theta.cos()), view(theta.sin()), full(theta.cos()), full(theta.sin())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind", ["[L, half]", "[B, L, 1, half]", "[1, L, H, half]", "heads-major view", "stride-0 expand"]
)
def test_qk_norm_rope_table_shapes(kind, backend):
    # L == H, so a [L, half] table read as per head (plain broadcasting) would be caught
    kernels.set_backend(backend)
    g = torch.Generator().manual_seed(4)
    B, L, H, Dh = 2, 3, 3, 16
    cos, sin, cos64, sin64 = _tables(kind, B, L, H, Dh // 2, g)
    leaves = _qk_weights(_qk_leaves(B, L, H, Dh, "none", None), H, "q")
    for inter in (True, False):
        f = lambda qkv, qw, kw: kernels.qk_norm_rope(*qkv.unbind(2)[:2], qw, kw, cos, sin, 1e-6, inter)
        f64 = lambda qkv, qw, kw: qk64(*qkv.unbind(2)[:2], qw, kw, cos64, sin64, 1e-6, inter)
        compare(f, f64, leaves, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", ["interleaved", "split"])
def test_qk_norm_rope_own_k_tables(rope, backend, dtype):
    # LTX-2's audio <-> video attention: q (7 tokens) and k (4 tokens) rotated by their own tables in one call, q's
    # weights across heads and k's per head; equals two calls with one table each, and the fp64 formula
    kernels.set_backend(backend)
    g = torch.Generator().manual_seed(6)
    H, Dh, inter = 3, 16, rope == "interleaved"
    tq, tk = torch.rand(1, 7, H, Dh // 2, generator=g) * 6.3, torch.rand(4, Dh // 2, generator=g) * 6.3
    leaves = dict(
        q=torch.randn(2, 7, H, Dh, generator=g),
        k=torch.randn(2, 4, H, Dh, generator=g),
        qw=torch.rand(H * Dh, generator=g) + 0.5,
        kw=torch.rand(Dh, generator=g) + 0.5,
    )
    f = lambda q, k, qw, kw: kernels.qk_norm_rope(q, k, qw, kw, tq.cos(), tq.sin(), 1e-6, inter, tk.cos(), tk.sin())
    f64 = lambda q, k, qw, kw: (
        qk64(q, q, qw, qw, tq.cos(), tq.sin(), 1e-6, inter)[0],
        qk64(k, k, kw, kw, tk[None, :, None].cos(), tk[None, :, None].sin(), 1e-6, inter)[0],
    )
    compare(f, f64, leaves, 2, dtype=dtype)
    q, k, qw, kw = (v.to(dtype) for v in leaves.values())
    one = kernels.qk_norm_rope(q, k, qw, kw, tq.cos(), tq.sin(), 1e-6, inter, tk.cos(), tk.sin())
    assert torch.equal(one[0], kernels.qk_norm_rope(q, q, qw, qw, tq.cos(), tq.sin(), 1e-6, inter)[0])
    assert torch.equal(one[1], kernels.qk_norm_rope(k, k, kw, kw, tk.cos(), tk.sin(), 1e-6, inter)[0])


# ----------------------------------------------------------------------------------------------------------
# Shape checks: both backends refuse the same bad shapes, with a ValueError that names the argument


def _bad_calls():
    x, y, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    q, w = torch.randn(2, 5, 3, 8), torch.ones(8)
    cs = torch.rand(5, 4)
    return [
        ("x must be", lambda: kernels.modulate(x[0], v, v)),
        ("shift must be", lambda: kernels.modulate(x, torch.randn(2, 9), v)),
        ("scale must be", lambda: kernels.modulate(x, v, torch.randn(2, 6, 8))),
        ("scale must be", lambda: kernels.modulate(x, v, torch.randn(3, 8))),
        ("y must have", lambda: kernels.gated_residual(x, v, y[:, :4])),
        ("gate must be", lambda: kernels.gated_residual(x, torch.randn(2, 5, 7), y)),
        ("m must be", lambda: kernels.gated_residual(x, v, y, torch.randn(8))),
        ("m_range", lambda: kernels.gated_residual(x, v, y, v, (0, 6))),
        ("m_range", lambda: kernels.gated_residual(x, v, y, v, (3, 2))),
        ("m_range", lambda: kernels.gated_residual_modulate(x, v, y, v, v, m=v, m_range=(-1, 2))),
        ("shift must be", lambda: kernels.gated_residual_modulate(x, v, y, torch.randn(2, 4, 8), v)),
        ("q must be", lambda: kernels.qk_norm_rope(q[0], q, w, w)),
        ("k_weight must be", lambda: kernels.qk_norm_rope(q, q, w, torch.ones(16))),
        ("q_weight must be", lambda: kernels.qk_norm_rope(q, q, torch.ones(9), w)),
        ("cos must broadcast", lambda: kernels.qk_norm_rope(q, q, w, w, torch.rand(6, 4), cs)),
        ("sin must broadcast", lambda: kernels.qk_norm_rope(q, q, w, w, cs, torch.rand(2, 5, 3, 8))),
        ("cos must broadcast", lambda: kernels.qk_norm_rope(q, q, w, w, torch.rand(3, 5, 1, 4), cs)),
        ("even head dim", lambda: kernels.qk_norm_rope(q[..., :7], q[..., :7], w[:7], w[:7], cs, cs)),
        ("both", lambda: kernels.qk_norm_rope(q, q, w, w, cs, None)),
        ("k_cos and k_sin must both", lambda: kernels.qk_norm_rope(q, q, w, w, cs, cs, k_cos=cs)),
        ("give q's cos / sin too", lambda: kernels.qk_norm_rope(q, q, w, w, k_cos=cs, k_sin=cs)),
        ("k_cos must broadcast", lambda: kernels.qk_norm_rope(q, q, w, w, cs, cs, k_cos=torch.rand(6, 4), k_sin=cs)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_refused_on_both_backends(backend):
    kernels.set_backend(backend)
    for match, call in _bad_calls():
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_edge_shapes_accepted_on_both_backends():
    # what the checks let through, both backends compute (and agree on)
    g = torch.Generator().manual_seed(0)
    x, y, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, generator=g)
    v_tok, q, w, theta = (
        torch.randn(1, 5, 8, generator=g),
        torch.randn(2, 5, 1, 7, generator=g),
        torch.rand(7),
        torch.rand(3),
    )
    calls = [
        lambda: kernels.modulate(x, v[:1], v_tok),
        lambda: kernels.gated_residual(x, v, y, v, (5, 5)),
        lambda: kernels.gated_residual_modulate(x, v, y, v, v, m=v, m_range=(0, 0)),
        lambda: kernels.qk_norm_rope(q, q, w, w),  # odd Dh without RoPE
        lambda: kernels.qk_norm_rope(q[..., :6], q[..., :6], w[:6], w[:6], theta.cos(), theta.sin()),
    ]  # H = 1
    for call in calls:
        kernels.set_backend("triton")
        got = call()
        kernels.set_backend("torch")
        ref = call()
        for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# fp64 gradcheck of every registered op (its Triton forward and backward)


def _gc(op, *args):
    assert torch.autograd.gradcheck(op, args, fast_mode=True, atol=1e-6, rtol=1e-5)


def _d(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck_modulate(rms):
    cond = _d(2, 30, seed=1)
    _gc(lambda x, c: torch.ops.paretoslider.modulate(x, c[:, :10], c[:, 10:20], 1e-6, rms), _d(2, 3, 10), cond)


@pytest.mark.parametrize("per_token", [False, True])
def test_gradcheck_modulate_per_token(per_token):
    # shift per token, scale per token or per sample
    c = _d(2, 3, 10, seed=1)
    s = _d(2, 3, 10, seed=2) if per_token else _d(2, 10, seed=2)
    _gc(lambda x, c, s: torch.ops.paretoslider.modulate(x, c, s, 1e-6, True), _d(2, 3, 10), c, s)


def test_gradcheck_gated_residual():
    op = torch.ops.paretoslider.gated_residual
    x, g, y, m = _d(2, 3, 10), _d(2, 10, seed=1), _d(2, 3, 10, seed=2), _d(2, 10, seed=3)
    _gc(lambda x, g, y, m: op(x, g, y, m, 0, 3), x, g, y, m)
    _gc(lambda x, g, y: op(x, g, y, None, 0, 3), x, g, y)
    _gc(lambda x, g, y, m: op(x, g, y, m, 1, 2), x, g, y, m)  # the slider on token 1 only


@pytest.mark.parametrize("m_per_token", [False, True])
def test_gradcheck_gated_residual_per_token(m_per_token):
    op = torch.ops.paretoslider.gated_residual
    m = _d(2, 4, 10, seed=3) if m_per_token else _d(2, 10, seed=3)
    _gc(lambda x, g, y, m: op(x, g, y, m, 1, 3), _d(2, 4, 10), _d(2, 4, 10, seed=1), _d(2, 4, 10, seed=2), m)


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck_gated_residual_modulate(rms):
    op = torch.ops.paretoslider.gated_residual_modulate
    _gc(
        lambda x, g, y, c, m: op(x, g, y, c[:, :10], c[:, 10:], 1e-6, rms, m, 0, 3),
        _d(2, 3, 10),
        _d(2, 10, seed=1),
        _d(2, 3, 10, seed=2),
        _d(2, 20, seed=3),
        _d(2, 10, seed=4),
    )


@pytest.mark.parametrize("gate_per_token", [False, True])
def test_gradcheck_gated_residual_modulate_per_token(gate_per_token):
    # shift/scale per token; the gate per token or per sample; the slider on tokens 1..2
    op = torch.ops.paretoslider.gated_residual_modulate
    g = _d(2, 4, 10, seed=1) if gate_per_token else _d(2, 10, seed=1)
    _gc(
        lambda x, g, y, c, m: op(x, g, y, c[..., :10], c[..., 10:], 1e-6, False, m, 1, 3),
        _d(2, 4, 10),
        g,
        _d(2, 4, 10, seed=2),
        _d(2, 4, 20, seed=3),
        _d(2, 10, seed=4),
    )


@pytest.mark.parametrize("rope", ["none", "interleaved", "split"])
def test_gradcheck_qk_norm_rope(rope):
    theta = torch.rand(1, 3, 1, 4, dtype=torch.float64) * 6.3
    cs = (None, None) if rope == "none" else (theta.cos(), theta.sin())
    op = torch.ops.paretoslider.qk_norm_rope
    _gc(
        lambda q, k, qw, kw: op(q, k, qw, kw, *cs, *cs, 1e-6, rope == "interleaved"),
        _d(2, 3, 2, 8),
        _d(2, 3, 2, 8, seed=1),
        _d(8, seed=2),
        _d(8, seed=3),
    )


@pytest.mark.parametrize("rope", ["none", "split"])
def test_gradcheck_qk_norm_rope_across_heads(rope):
    # q: [H * Dh] weight (one norm over the token's 3 heads), k: [Dh] weight; per-head tables
    theta = torch.rand(2, 3, 3, 4, dtype=torch.float64) * 6.3
    cs = (None, None) if rope == "none" else (theta.cos(), theta.sin())
    op = torch.ops.paretoslider.qk_norm_rope
    _gc(
        lambda q, k, qw, kw: op(q, k, qw, kw, *cs, *cs, 1e-6, False),
        _d(2, 3, 3, 8),
        _d(2, 3, 3, 8, seed=1),
        _d(24, seed=2),
        _d(8, seed=3),
    )


def test_gradcheck_qk_norm_rope_own_k_tables():
    # cross-attention: k has other positions (and another length) than q, with its own table
    tq, tk = (torch.rand(1, L, 1, 4, dtype=torch.float64) * 6.3 for L in (3, 5))
    op = torch.ops.paretoslider.qk_norm_rope
    _gc(
        lambda q, k, qw, kw: op(q, k, qw, kw, tq.cos(), tq.sin(), tk.cos(), tk.sin(), 1e-6, False),
        _d(2, 3, 2, 8),
        _d(2, 5, 2, 8, seed=1),
        _d(16, seed=2),
        _d(16, seed=3),
    )


# ----------------------------------------------------------------------------------------------------------
# Backend switch, and proof that the tests above ran the kernels (not a silent fallback to the references)


def _explode(*a, **k):
    raise AssertionError("reference called on the triton backend")


def test_triton_backend_runs_kernels_torch_backend_runs_references(monkeypatch):
    import kernels.adaln  # noqa: E401
    import kernels.qk_rope
    import kernels.residual

    x, y, cond, m = _res_leaves(2, 5, 24, True).values()
    tcond = torch.randn(2, 5, 72)
    q, k = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    w, theta = torch.ones(16), torch.rand(5, 1, 8)
    calls = lambda: (
        kernels.modulate(x, cond[:, :24], cond[:, 24:48]),
        kernels.gated_residual(x, cond[:, :24], y, m),
        kernels.gated_residual_modulate(x, cond[:, :24], y, cond[:, 24:48], cond[:, 48:72], m=m),
        kernels.qk_norm_rope(q, k, w, w, theta.cos(), theta.sin()),
        # the new modes take the kernels too: per-token conditioning, m_range, [H * Dh], [L, Dh/2]
        kernels.modulate(x, tcond[..., :24], cond[:, :24]),
        kernels.gated_residual(x, tcond[..., :24], y, m, (2, 4)),
        kernels.gated_residual_modulate(x, tcond[..., :24], y, tcond[..., 24:48], cond[:, :24], m=m, m_range=(1, 5)),
        kernels.qk_norm_rope(q, k, torch.ones(32), w, theta[:, 0].cos(), theta[:, 0].sin(), 1e-6, False),
    )
    expected = calls()
    for mod, name in [
        (kernels.adaln, "modulate_ref"),
        (kernels.residual, "gated_residual_ref"),
        (kernels.residual, "gated_residual_modulate_ref"),
        (kernels.qk_rope, "qk_norm_rope_ref"),
    ]:
        monkeypatch.setattr(mod, name, _explode)
    for got, ref in zip(calls(), expected):  # triton backend: no reference is touched
        for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert torch.equal(a, b)
    kernels.set_backend("torch")
    assert kernels.get_backend() == "torch"
    with pytest.raises(AssertionError, match="reference called"):
        kernels.modulate(x, cond[:, :24], cond[:, 24:48])
    with pytest.raises(ValueError):
        kernels.set_backend("cuda")


def test_default_backend():
    # fresh processes: Triton + TRITON_INTERPRET=1 -> the kernels; a CPU without the interpreter -> the references
    def default(interpret):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update({"TRITON_INTERPRET": "1"} if interpret else {})
        r = subprocess.run(
            [sys.executable, "-c", "import kernels; print(kernels.get_backend())"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return r.stdout.strip() + r.stderr

    assert default(True) == "triton"
    assert default(False) == ("triton" if torch.cuda.is_available() else "torch")


def test_kernels_stay_at_the_bottom_of_the_import_graph():
    # kernels/ (bench.py included) imports no project module: the model imports kernels, never the reverse
    import ast

    project = {"model", "train", "sample", "rewards", "benchmarks", "tests"}
    for name in os.listdir(os.path.join(ROOT, "kernels")):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "kernels", name)).read())
            for node in ast.walk(tree):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                assert not {m.split(".")[0] for m in mods} & project, f"kernels/{name} imports {mods}"


@pytest.mark.parametrize("script", ["kernels/bench.py", "benchmarks/blocks.py"])
def test_benchmark_scripts_run_on_cpu(script, monkeypatch, capsys):
    # the op rows (every mode) and the whole-block rows, on tiny shapes through the interpreter
    if script.startswith("benchmarks"):
        pytest.importorskip("model")
    import runpy

    monkeypatch.setattr(sys, "argv", [script, "--cpu-smoke", "--no-compile"])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    out = capsys.readouterr().out
    assert "done in" in out and "nan" not in out, out[-3000:]


# ----------------------------------------------------------------------------------------------------------
# The kernels lower for a real GPU (sm_90 PTX through ptxas, offline), so nothing interpreter-only slipped in


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "kernels", "bench.py"), "--ptx"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RESULT 42 launches compiled" in r.stdout, r.stdout[-3000:]


# ----------------------------------------------------------------------------------------------------------
# The tiny SD3.5 model (model.py): output and every gradient with kernels on == kernels off


def test_sd35_tiny_model_kernels_on_equals_off():
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    net = model.SD3Transformer(model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2))
    with torch.no_grad():  # random everything, so zero-inits (slider, adaLN) cannot hide a term
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.9, 0.3])
    ctx, pooled = torch.randn(2, 5, 64, generator=g), torch.randn(2, 64, generator=g)
    pref = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    w = torch.randn(2, 3, 16, 16, generator=g)

    def run(backend):
        kernels.set_backend(backend)
        net.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = net(xi, sigma, ctx, pooled, pref)
        (out * w).sum().backward()
        return out.detach(), xi.grad, {n: p.grad for n, p in net.named_parameters()}

    out_t, dx_t, grads_t = run("triton")
    out_r, dx_r, grads_r = run("torch")
    assert out_r.abs().max() > 0.1 and dx_r.abs().max() > 0  # a live network, not a zero map
    torch.testing.assert_close(out_t, out_r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dx_t, dx_r, atol=1e-5, rtol=1e-4)
    assert grads_t.keys() == grads_r.keys()
    for n in grads_r:
        assert grads_r[n] is not None and grads_t[n] is not None, n
        torch.testing.assert_close(
            grads_t[n], grads_r[n], atol=1e-5 * (1 + grads_r[n].abs().max().item()), rtol=1e-4, msg=n
        )


@pytest.mark.parametrize("first", ["ours", "transformers"])
def test_transformers_and_hub_kernels_beside_ours(first):
    # transformers >= 5.25 requires Hugging Face's `kernels` (the hub kernels) and imports names from it when a model
    # module loads (integrations/hub_kernels.py: `from kernels import CUDAProperties, ...` once its installed metadata
    # says it is there). Our kernels/ owns the import name and serves Hugging Face's names too (kernels/__init__.py):
    # in a fresh interpreter, in either import order, a transformers model builds and runs, our ops stay ours, and
    # the hub's names are the hub's (where it is installed; without it transformers never asks)
    import importlib.metadata

    try:
        hub = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        hub = None
    imports = ["import kernels", "from transformers import T5Config, T5EncoderModel"]
    code = (
        "\n".join(imports if first == "ours" else imports[::-1])
        + """
import torch
from transformers.utils import is_kernels_available
net = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
out = net(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
hub = kernels.get_kernel.__module__ if is_kernels_available() else None
print(kernels.modulate.__module__, is_kernels_available(), hub, tuple(out.shape))
"""
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ours, available, where, shape = p.stdout.split(maxsplit=3)
    assert ours == "kernels.adaln" and shape.strip() == "(1, 3, 16)"
    assert available == str(hub is not None)
    assert (where == "None") if hub is None else (where.startswith("kernels._") and where != "kernels.adaln")

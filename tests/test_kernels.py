"""kernels/: the Triton kernels (run by the interpreter on CPU) against independent fp64 references.

Every public function is checked forward and for every gradient, in fp32 (tight) and bf16 (one bf16 rounding),
on odd shapes (D not a power of two, ragged row tiles, several programs per sample), with the inputs the model
really passes (strided views of the adaLN and qkv outputs, stride-0 gradients from .sum()), and by fp64
gradcheck of each torch.library op. The model test runs the tiny SD3.5 with kernels on and off.
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


def modulate64(x, shift, scale, eps=1e-6, rms=False):
    return norm64(x, eps, rms) * (1 + scale.double()[:, None]) + shift.double()[:, None]


def residual64(x, gate, y, m=None):
    y = y.double() if m is None else y.double() + m.double()[:, None]
    return x.double() + gate.double()[:, None] * y


def residual_modulate64(x, gate, y, shift, scale, eps=1e-6, rms=False, m=None, h_stored=None):
    # h is stored in x's dtype, then normalised. h_stored: the kernel's own h (checked on its own against h64),
    # so the norm sees the same rounding (the interpreter truncates to bf16 where torch rounds to nearest).
    h = residual64(x, gate, y, m)
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
    out = []
    for t, w in ((q, qw), (k, kw)):
        t = norm64(t, eps, rms=True) * w.double()
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


# The model passes the adaLN output split with .chunk(6, dim=1): strided [B, D] views, columns dense.
def chunked(cond, i, n=6):
    return cond.chunk(n, dim=1)[i]


SHAPES = [(2, 7, 48), (1, 5, 123), (5, 123, 123), (2, 16, 64)]
SMALL = [(2, 7, 48), (1, 5, 123)]
FORCE = [None, (2, 4)]  # auto tiling; 2-row tiles, 4 rows per program: several programs per sample, ragged tails


def _force(f):
    _common.FORCE_ROWS = f


# ----------------------------------------------------------------------------------------------------------
# modulate


def _mod_leaves(B, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, T, D, generator=g) * 2 + 0.5, cond=torch.randn(B, 6 * D, generator=g) * 0.5)


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
    leaves = dict(xt=torch.randn(9, 3, 40, generator=g), shift=torch.randn(1, 40, generator=g),
                  scale=torch.randn(1, 40, generator=g))
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


def _res_leaves(B, T, D, slider, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = dict(x=torch.randn(B, T, D, generator=g), y=torch.randn(B, T, D, generator=g) * 3,
                  cond=torch.randn(B, 6 * D, generator=g))
    if slider:
        leaves["m"] = torch.randn(B, D, generator=g)
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
        h, x_mod = kernels.gated_residual_modulate(x, chunked(cond, 2), y, chunked(cond, 3), chunked(cond, 4),
                                                   1e-6, rms, m)
        stored["h"] = h.detach()
        return h, x_mod

    def f64(x, y, cond, m=None):
        return residual_modulate64(x, chunked(cond, 2), y, chunked(cond, 3), chunked(cond, 4), 1e-6, rms, m,
                                   stored.get("h"))
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
    leaves = dict(qkv=torch.randn(B, L, 3, H, Dh, generator=g) * 2, qw=torch.rand(Dh, generator=g) + 0.5,
                  kw=torch.rand(Dh, generator=g) + 0.5)
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
# fp64 gradcheck of every registered op (its Triton forward and backward)


def _gc(op, *args):
    assert torch.autograd.gradcheck(op, args, fast_mode=True, atol=1e-6, rtol=1e-5)


def _d(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck_modulate(rms):
    cond = _d(2, 30, seed=1)
    _gc(lambda x, c: torch.ops.paretoslider.modulate(x, c[:, :10], c[:, 10:20], 1e-6, rms), _d(2, 3, 10), cond)


def test_gradcheck_gated_residual():
    op = torch.ops.paretoslider.gated_residual
    _gc(lambda x, g, y, m: op(x, g, y, m), _d(2, 3, 10), _d(2, 10, seed=1), _d(2, 3, 10, seed=2), _d(2, 10, seed=3))
    _gc(lambda x, g, y: op(x, g, y, None), _d(2, 3, 10), _d(2, 10, seed=1), _d(2, 3, 10, seed=2))


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck_gated_residual_modulate(rms):
    op = torch.ops.paretoslider.gated_residual_modulate
    _gc(lambda x, g, y, c, m: op(x, g, y, c[:, :10], c[:, 10:], 1e-6, rms, m),
        _d(2, 3, 10), _d(2, 10, seed=1), _d(2, 3, 10, seed=2), _d(2, 20, seed=3), _d(2, 10, seed=4))


@pytest.mark.parametrize("rope", ["none", "interleaved", "split"])
def test_gradcheck_qk_norm_rope(rope):
    theta = torch.rand(1, 3, 1, 4, dtype=torch.float64) * 6.3
    cs = (None, None) if rope == "none" else (theta.cos(), theta.sin())
    op = torch.ops.paretoslider.qk_norm_rope
    _gc(lambda q, k, qw, kw: op(q, k, qw, kw, *cs, 1e-6, rope == "interleaved"),
        _d(2, 3, 2, 8), _d(2, 3, 2, 8, seed=1), _d(8, seed=2), _d(8, seed=3))


# ----------------------------------------------------------------------------------------------------------
# Backend switch, and proof that the tests above ran the kernels (not a silent fallback to the references)


def _explode(*a, **k):
    raise AssertionError("reference called on the triton backend")


def test_triton_backend_runs_kernels_torch_backend_runs_references(monkeypatch):
    import kernels.adaln, kernels.qk_rope, kernels.residual  # noqa: E401
    x, y, cond, m = _res_leaves(2, 5, 24, True).values()
    q, k = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    w, theta = torch.ones(16), torch.rand(5, 1, 8)
    calls = lambda: (kernels.modulate(x, cond[:, :24], cond[:, 24:48]),
                     kernels.gated_residual(x, cond[:, :24], y, m),
                     kernels.gated_residual_modulate(x, cond[:, :24], y, cond[:, 24:48], cond[:, 48:72], m=m),
                     kernels.qk_norm_rope(q, k, w, w, theta.cos(), theta.sin()))
    expected = calls()
    for mod, name in [(kernels.adaln, "modulate_ref"), (kernels.residual, "gated_residual_ref"),
                      (kernels.residual, "gated_residual_modulate_ref"), (kernels.qk_rope, "qk_norm_rope_ref")]:
        monkeypatch.setattr(mod, name, _explode)
    assert torch.equal(calls()[0], expected[0])  # triton backend: no reference is touched
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
        r = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.get_backend())"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip() + r.stderr
    assert default(True) == "triton"
    assert default(False) == ("triton" if torch.cuda.is_available() else "torch")


# ----------------------------------------------------------------------------------------------------------
# The kernels lower for a real GPU (sm_90 PTX through ptxas, offline), so nothing interpreter-only slipped in


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "bench.py"), "--ptx"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RESULT 32 launches compiled" in r.stdout, r.stdout[-3000:]


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
        torch.testing.assert_close(grads_t[n], grads_r[n], atol=1e-5 * (1 + grads_r[n].abs().max().item()),
                                   rtol=1e-4, msg=n)

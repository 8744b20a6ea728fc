"""Fused elementwise ops on the preference-modulated attention path, in Triton, forward and backward.

Public functions (the model calls only these); x, y [B, T, D]:
  modulate(x, shift, scale, eps, rms=False)      norm(x) * (1 + scale) + shift (LayerNorm, or RMSNorm), no affine
  gated_residual(x, gate, y, m=None, m_range=None)
                                                 x + gate * y, or the slider residual x + gate * (y + m), with m
                                                 on tokens start..end-1 only if m_range = (start, end) is given
  gated_residual_modulate(x, gate, y, shift, scale, eps, rms=False, m=None, m_range=None)
                                                 (h, modulate(h, shift, scale)) with h = gated_residual(x, gate, y,
                                                 m, m_range)
  qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved=True, k_cos=None, k_sin=None)
                                                 q, k [B, L, H, Dh]: RMSNorm with weight, per head (weights [Dh]) or
                                                 over all H * Dh features of a token (weights [H * Dh], LTX-2), then
                                                 rotary embedding per head: pairs (2i, 2i+1) (interleaved, FLUX) or
                                                 (i, i + Dh/2) (split, LTX-2); cos, sin broadcast to
                                                 [B, L, H, Dh/2] ([L, Dh/2]: one row per token), or None: no RoPE;
                                                 k_cos, k_sin: k's own tables (cross-attention), else q's
  set_backend("triton" | "torch"), get_backend()
Conditioning shift, scale, gate, m: [B, D], one vector per sample over the tokens, or [B, T, D], one per token
(LTX-2's per-token timestep); a leading 1 is shared by the batch; they may mix. Bad shapes raise ValueError
on both backends alike.

Each op file holds the plain PyTorch reference (the "torch" backend), the Triton kernels, and their
registration as torch.library ops (paretoslider::*) with autograd, so torch.compile traces around them.
The default backend is "triton" when Triton imports and CUDA is available or TRITON_INTERPRET=1 is set
(then the kernels run on CPU tensors through the interpreter: that is how the tests exercise them).
kernels/ imports nothing else of the project (kernels/bench.py: the ops; benchmarks/blocks.py: model blocks).
"""

import importlib.machinery
import importlib.util
import os
import sys

from ._common import get_backend, set_backend
from .adaln import modulate, modulate_ref
from .qk_rope import qk_norm_rope, qk_norm_rope_ref
from .residual import gated_residual, gated_residual_modulate, gated_residual_modulate_ref, gated_residual_ref

__all__ = [
    "modulate",
    "gated_residual",
    "gated_residual_modulate",
    "qk_norm_rope",
    "set_backend",
    "get_backend",
    "modulate_ref",
    "gated_residual_ref",
    "gated_residual_modulate_ref",
    "qk_norm_rope_ref",
]


# Hugging Face's `kernels` package (hub kernels) has our import name, and transformers >= 5.25 requires it: it
# checks for it by its installed metadata, then runs `from kernels import CUDAProperties, ...` at start-up. Whichever
# folder comes first on sys.path owns the name; when it is ours, this package serves Hugging Face's as well: its
# folder goes after ours in __path__ (so its absolute `kernels._internals...` imports resolve), its __init__ runs
# on first use in a module object of its own (never in sys.modules), and __getattr__ hands out its public names.
def _find_hf_kernels():
    here = os.path.realpath(os.path.dirname(__file__))
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec(__name__, [entry or os.curdir])
        locations = spec and spec.submodule_search_locations
        if locations and spec.origin and os.path.realpath(os.path.dirname(spec.origin)) != here:
            return spec
    return None


_hf_spec = _find_hf_kernels()
if _hf_spec is not None:
    __path__.extend(_hf_spec.submodule_search_locations)  # ours first: our submodules win any clash
_hf_module = None


def _hf_kernels():
    global _hf_module
    if _hf_module is None and _hf_spec is not None:
        module = importlib.util.module_from_spec(_hf_spec)
        _hf_module = module  # set first: a circular `from kernels import x` during its __init__ fails, not recurses
        try:
            _hf_spec.loader.exec_module(module)
        except BaseException:
            _hf_module = None
            raise
    return _hf_module


def __getattr__(name):
    # Our own submodules and private names stay AttributeErrors (hasattr and `from kernels import bench` rely on it).
    ours = os.path.exists(os.path.join(os.path.dirname(__file__), name + ".py"))
    if not ours and (not name.startswith("_") or name == "__version__"):
        hf = _hf_kernels()
        if hf is not None and hasattr(hf, name):
            return getattr(hf, name)
    if ours or name.startswith("_"):
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    raise ImportError(
        f"kernels.{name}: this is ParetoSlider's kernels/ package, which shadows Hugging Face's `kernels`, and "
        f"Hugging Face's is not installed (pip install 'kernels>=0.19.1,<0.20', or transformers<5.25)"
    )

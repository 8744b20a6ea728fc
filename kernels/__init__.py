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

import os

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


def __getattr__(name):
    # Hugging Face's `kernels` package has the same import name; transformers >= 5.25 depends on it and imports
    # names from it at start-up, which then land here. Say so instead of a bare "cannot import name". Private
    # names and our own submodules stay AttributeErrors (hasattr and `from kernels import bench` rely on that).
    if name.startswith("_") or os.path.exists(os.path.join(os.path.dirname(__file__), name + ".py")):
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    raise ImportError(
        f"kernels.{name}: this is ParetoSlider's kernels/ package, which shadows Hugging Face's "
        f"`kernels` (imported by transformers >= 5.25); install 'transformers<5.25' "
        f"(requirements.txt pins it)"
    )

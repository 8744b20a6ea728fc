"""Fused elementwise ops on the preference-modulated attention path, in Triton, forward and backward.

Public functions (the model calls only these):
  modulate(x, shift, scale, eps, rms=False)      norm(x) * (1 + scale) + shift, scale/shift [B, D] over tokens
  gated_residual(x, gate, y, m=None)             x + gate * y   (or x + gate * (y + m), the slider residual)
  gated_residual_modulate(x, gate, y, shift, scale, eps, rms=False, m=None)
                                                 (h, modulate(h, shift, scale)) with h = gated_residual(x, gate, y, m)
  qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved=True)
                                                 per-head RMSNorm with weight, then rotary embedding (None: no RoPE)
  set_backend("triton" | "torch"), get_backend()

Each op file holds the plain PyTorch reference (the "torch" backend), the Triton kernels, and their
registration as torch.library ops (paretoslider::*) with autograd, so torch.compile traces around them.
The default backend is "triton" when Triton imports and CUDA is available or TRITON_INTERPRET=1 is set
(then the kernels run on CPU tensors through the interpreter: that is how the tests exercise them).
"""
from ._common import get_backend, set_backend
from .adaln import modulate, modulate_ref
from .qk_rope import qk_norm_rope, qk_norm_rope_ref
from .residual import gated_residual, gated_residual_modulate, gated_residual_modulate_ref, gated_residual_ref

__all__ = ["modulate", "gated_residual", "gated_residual_modulate", "qk_norm_rope", "set_backend", "get_backend",
           "modulate_ref", "gated_residual_ref", "gated_residual_modulate_ref", "qk_norm_rope_ref"]

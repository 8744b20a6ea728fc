"""Fused elementwise ops on the preference-modulated attention path.

Public functions (the model calls only these):
  modulate(x, shift, scale, eps, rms=False)      norm(x) * (1 + scale) + shift, scale/shift [B, D] over tokens
  gated_residual(x, gate, y, m=None)             x + gate * y   (or x + gate * (y + m), the slider residual)
  qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved=True)
                                                 per-head RMSNorm with weight, then rotary embedding (None: no RoPE)
This first version holds only the PyTorch references; the Triton kernels come with issue 4.
"""
import torch


def modulate(x, shift, scale, eps=1e-6, rms=False):
    # x [B, L, D]; shift, scale [B, D]. Norm without affine, fp32 math, result in x's dtype.
    xf = x.float()
    if rms:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        xf = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps)
    return (xf * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def gated_residual(x, gate, y, m=None):
    # x, y [B, L, D]; gate, m [B, D]
    if m is not None:
        y = y + m[:, None]
    return x + gate[:, None] * y


def qk_norm_rope(q, k, q_weight, k_weight, cos=None, sin=None, eps=1e-6, interleaved=True):
    # q, k [B, L, H, Dh]; weights [Dh]; cos, sin broadcastable to [B, L, H, Dh/2] or None.
    def norm(t, w):
        tf = t.float()
        return tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    def rope(t):
        if cos is None:
            return t
        if interleaved:
            t1, t2 = t[..., 0::2], t[..., 1::2]
            return torch.stack([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1).flatten(-2)
        t1, t2 = t.chunk(2, -1)
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    return rope(norm(q, q_weight)).to(q.dtype), rope(norm(k, k_weight)).to(k.dtype)

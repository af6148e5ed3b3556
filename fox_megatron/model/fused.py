"""The FoX (Pro) layer's elementwise work, fused by torch.compile on the GPU.

Around the attention kernel a FoX (Pro) layer does a dozen small elementwise
steps (gate sigmoids, the key/value token shift, per-head RMSNorms of q, k
and the output, the log forget gate, the output gate), each a kernel launch
forward and more backward.  At small model sizes the GPU finishes them
faster than the host can launch them, so the step becomes launch-bound.
Each function below is one region that torch.compile (Inductor) turns into a
few fused kernels, forward and backward; on the CPU, in fp64 (tests), or with
``FoxConfig.fuse_elementwise`` off, the same functions run eagerly, so both
paths compute the same math.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["at_least_fp32", "shift_tokens", "kv_shift", "head_rms_norm", "log_forget_gate", "gate_output",
           "before_attention", "after_attention", "maybe_compiled"]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    # gates are computed in fp32 (fp64 inputs, used by tests, stay fp64)
    return t if t.dtype == torch.float64 else t.float()


def shift_tokens(x: torch.Tensor, gate: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """x'_t = a_t x_{t-1} + (1 - a_t) x_t along dim 0 of an sbhd tensor.

    x: [T, B, H, D]; gate a: [T, B, H] in (0, 1); starts: [T, B] bool.  The
    token before a sequence start counts as zero, as before the first token
    of a row, so no document sees its predecessor.
    """
    prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]], dim=0)
    prev = prev.masked_fill(starts[:, :, None, None], 0.0)
    a = gate.to(x.dtype).unsqueeze(-1)
    return x + a * (prev - x)


def kv_shift(k: torch.Tensor, v: torch.Tensor, k_logits: torch.Tensor, v_logits: torch.Tensor,
             starts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token shift of k and v with their gates a = sigmoid(logits)."""
    k = shift_tokens(k, torch.sigmoid(at_least_fp32(k_logits)), starts)
    v = shift_tokens(v, torch.sigmoid(at_least_fp32(v_logits)), starts)
    return k, v


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of [..., heads, head_dim] with a weight per
    head ([heads, head_dim]); statistics in fp32 (fp64 stays fp64)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(cd)).to(x.dtype)


def log_forget_gate(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """log f = logsigmoid(logits + b), in fp32 (fp64 stays fp64)."""
    return F.logsigmoid(at_least_fp32(logits) + at_least_fp32(bias))


def gate_output(o: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """o * sigmoid(logits), the gate in fp32, the product in o's dtype."""
    return o * torch.sigmoid(at_least_fp32(logits)).to(o.dtype)


def before_attention(q, k, v, k_shift_logits, v_shift_logits, starts, q_norm_weight, k_norm_weight, eps: float,
                     forget_logits, forget_bias):
    """Everything between the fused projection and the kernel, one region:
    token shift of k and v (when shift logits are given), per-head RMSNorm
    of q and k (when norm weights are given), the log forget gate.
    Returns (q, k, v, log_fgate)."""
    if k_shift_logits is not None:
        k, v = kv_shift(k, v, k_shift_logits, v_shift_logits, starts)
    if q_norm_weight is not None:
        q = head_rms_norm(q, q_norm_weight, eps)
        k = head_rms_norm(k, k_norm_weight, eps)
    return q, k, v, log_forget_gate(forget_logits, forget_bias)


def after_attention(o, out_norm_weight, eps: float, gate_logits):
    """Per-head output RMSNorm (when a weight is given), heads merged into
    the hidden dim, the output gate (when logits are given): o [T, B, H, D]
    -> [T, B, H * D]."""
    if out_norm_weight is not None:
        o = head_rms_norm(o, out_norm_weight, eps)
    o = o.reshape(o.shape[0], o.shape[1], -1)
    if gate_logits is not None:
        o = gate_output(o, gate_logits)
    return o


# Why two regions and not one per step: each call of a compiled function
# costs the host 0.1-0.2 ms (guards, autograd wrappers), as much as several
# eager kernel launches.
_COMPILED: Dict[Callable, Callable] = {}


def maybe_compiled(fn: Callable, like: torch.Tensor, enabled: bool) -> Callable:
    """``fn`` compiled (once per function; Inductor keys on shapes and
    dtypes) when ``enabled`` and ``like`` is a CUDA tensor below fp64, else
    ``fn`` itself."""
    if not enabled or not like.is_cuda or like.dtype == torch.float64:
        return fn
    compiled: Optional[Callable] = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return compiled

"""Norms for the FoX layer spec that also work with sequence parallelism.

Megatron's torch fallback (``WrappedTorchNorm``) refuses
``sequence_parallel``; with TE absent that rules SP out.  ``FoxNorm`` is the
same math in plain torch.  Under SP each TP rank normalises its own slice of
the sequence, so its weight gradient is only a partial sum: the parameters
are tagged ``sequence_parallel`` and Megatron's ``finalize_model_grads``
all-reduces them across the TP group, as it does for its own LayerNorms.

``HeadRMSNorm`` is the per-head RMSNorm of FoX Pro (q, k and output norms):
one weight row per head, split over TP with the heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["FoxNorm", "HeadRMSNorm", "param_device"]


def param_device(config: TransformerConfig):
    """Where Megatron's own layers allocate under this config."""
    return torch.device("cpu") if config.use_cpu_initialization else torch.device("cuda", torch.cuda.current_device())


class FoxNorm(torch.nn.Module):
    """LayerNorm or RMSNorm over the hidden size, chosen by ``config.normalization``.

    Accepts the keyword arguments Megatron's ``build_module`` passes to a
    norm (config, hidden_size, eps) and ignores the ones it has no use for.
    Statistics are computed in fp32 whatever the activation dtype.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        kind = getattr(config, "normalization", "LayerNorm")
        if kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"FoxNorm supports LayerNorm and RMSNorm, got {kind!r}")
        self.rms = kind == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        # zero-centred gamma stores (gamma - 1) so weight decay pulls gamma to 1
        self.zero_centered_gamma = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        device = param_device(config)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        if self.rms:
            self.register_parameter("bias", None)
        else:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
        self.sequence_parallel = bool(config.sequence_parallel)
        for p in self.parameters():
            setattr(p, "sequence_parallel", self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = self.weight.to(cd)
        if self.zero_centered_gamma:
            w = w + 1.0
        xf = x.to(cd)
        if self.rms:
            y = F.rms_norm(xf, (self.hidden_size,), w, self.eps)
        else:
            y = F.layer_norm(xf, (self.hidden_size,), w, None if self.bias is None else self.bias.to(cd), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{'RMSNorm' if self.rms else 'LayerNorm'}({self.hidden_size}, eps={self.eps})"


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over the last dim of [..., heads, head_dim], a weight per head.

    ``num_heads`` is the number of heads on this TP rank; the weight
    [num_heads, head_dim] is the rank's slice of the global [H, head_dim] and
    carries Megatron's tensor-parallel attributes (partition dim 0).
    """

    def __init__(self, config: TransformerConfig, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(num_heads, head_dim, dtype=config.params_dtype, device=param_device(config))
        )
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .fused import head_rms_norm

        return head_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"

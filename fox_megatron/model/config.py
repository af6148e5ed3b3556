"""FoX options and how they reach the attention module.

Two ways in:

* ``FoxTransformerConfig`` -- Megatron's ``TransformerConfig`` with a ``fox``
  field; what this package's trainer builds.
* a plain ``TransformerConfig`` -- what Megatron-LM's ``pretrain_gpt.py``
  builds from its own arguments when the layer spec comes from ``--spec``.
  There is no argparse flag for FoX options on that path, so the options take
  their defaults, overridden by ``FOX_*`` environment variables (read in
  ``FoxConfig.from_env`` and nowhere else).

A layer spec may carry further overrides (``fox_layer_spec_no_acp`` turns ACP
off); they are applied last, see ``resolve_fox_config``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["FoxConfig", "FoxTransformerConfig", "resolve_fox_config", "ENV_PREFIX"]

ENV_PREFIX = "FOX_"
_BACKENDS = ("auto", "triton", "torch")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class FoxConfig:
    """Forgetting Transformer (FoX Pro) layer options.

    acp:                   prune with Adaptive Computation Pruning.
    acp_log_eps:           log of the attention mass a query may lose to ACP.
    acp_min_seqlen:        prune only when the longest sequence (document)
                           of the call has at least this many tokens
                           (``AcpConfig.min_seqlen``; 0: always).  With
                           512-token documents ACP made the attention step
                           up to 12% slower on an H200, with 1024-token ones
                           1-8% faster (benchmark gates).  Not used by the
                           context-parallel ring, which prunes whole chunk
                           pairs.
    qk_norm:               per-head RMSNorm of q and k (also gives the ACP
                           logit bound without a pass over the data).
    output_gate:           o * sigmoid(W_g x) before the output projection.
    output_norm:           per-head RMSNorm of the attention output.
    kv_shift:              k'_t = a_t k_{t-1} + (1 - a_t) k_t (and v), a_t a
                           per-head scalar gate.
    forget_gate_bias_init: initial bias of the forget gate logits.
    use_rope:              rotate q and k with the rotary embedding the model
                           provides (FoX needs no positional encoding).
    attention_backend:     "auto" (Triton on CUDA, torch on CPU), "triton",
                           "torch".
    collect_acp_stats:     keep the kept-tile fraction of every forward.
    fuse_elementwise:      on the GPU, torch.compile the layer's elementwise
                           work around the kernel (gates, token shift,
                           per-head norms) into fused kernels (fused.py).
    cp_mode:               context parallelism (context_parallel_size > 1):
                           "ring" (pruning-aware ring attention) or
                           "ulysses" (head all-to-all); both take packed
                           documents (cu_seqlens over the global rows).
    precise_decay:         keep the cumulative decay in float64: exact
                           decays for long
                           documents with fast-forgetting heads, where a
                           float32 prefix sum errs by |c| * 2^-24 (with
                           context parallelism c spans the whole sequence);
                           costs 4-15% of the attention step.
    """

    acp: bool = True
    acp_log_eps: float = -10.0
    acp_min_seqlen: int = 0
    qk_norm: bool = True
    output_gate: bool = True
    output_norm: bool = True
    kv_shift: bool = True
    forget_gate_bias_init: float = 0.0
    use_rope: bool = False
    attention_backend: str = "auto"
    collect_acp_stats: bool = True
    fuse_elementwise: bool = True
    cp_mode: str = "ring"
    precise_decay: bool = False

    def __post_init__(self):
        if self.acp and not self.acp_log_eps < 0.0:
            raise ValueError(f"acp_log_eps must be negative (eps < 1), got {self.acp_log_eps}")
        if isinstance(self.acp_min_seqlen, bool) or not isinstance(self.acp_min_seqlen, int) or self.acp_min_seqlen < 0:
            raise ValueError(f"acp_min_seqlen must be an int >= 0, got {self.acp_min_seqlen!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if self.cp_mode not in ("ring", "ulysses"):
            raise ValueError(f"cp_mode must be 'ring' or 'ulysses', got {self.cp_mode!r}")

    @classmethod
    def pro(cls, **overrides) -> "FoxConfig":
        """FoX (Pro) as in the FoX paper: every feature on, no RoPE."""
        return cls(**overrides)

    @classmethod
    def basic(cls, **overrides) -> "FoxConfig":
        """Plain FoX: forget gate only (the paper's "FoX (LLaMA)")."""
        base = dict(qk_norm=False, output_gate=False, output_norm=False, kv_shift=False)
        base.update(overrides)
        return cls(**base)

    def replace(self, **overrides) -> "FoxConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown FoX option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_env(cls, base: Optional["FoxConfig"] = None, environ: Optional[Mapping[str, str]] = None) -> "FoxConfig":
        """``base`` (default: defaults) with ``FOX_<FIELD>`` variables applied.

        FOX_ACP=0, FOX_ACP_LOG_EPS=-8, FOX_KV_SHIFT=off, FOX_USE_ROPE=1,
        FOX_ATTENTION_BACKEND=torch, ...  A malformed value is an error, not
        a silent default: a typo should not change the model.
        """
        environ = os.environ if environ is None else environ
        base = base if base is not None else cls()
        updates = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            updates[f.name] = _parse(f.name, raw.strip(), type(getattr(base, f.name)))
        return dataclasses.replace(base, **updates) if updates else base

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse(name: str, raw: str, kind: type) -> Any:
    var = ENV_PREFIX + name.upper()
    if kind is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{var}={raw!r}: expected one of {_TRUE + _FALSE}")
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected a number") from None
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected an integer") from None
    return raw


@dataclass
class FoxTransformerConfig(TransformerConfig):
    """Megatron ``TransformerConfig`` carrying the FoX options."""

    fox: FoxConfig = field(default_factory=FoxConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fox, Mapping):  # e.g. straight from a YAML file
            self.fox = FoxConfig(**self.fox)


def resolve_fox_config(config: TransformerConfig, overrides: Optional[Mapping[str, Any]] = None) -> FoxConfig:
    """The FoX options for one layer.

    ``config.fox`` when the config carries one, otherwise defaults with the
    environment applied; then the spec's ``overrides`` (explicit in code, so
    they win).
    """
    fox = getattr(config, "fox", None)
    if fox is None:
        fox = FoxConfig.from_env()
    elif isinstance(fox, Mapping):
        fox = FoxConfig(**fox)
    elif not isinstance(fox, FoxConfig):
        raise TypeError(f"config.fox must be a FoxConfig, got {type(fox).__name__}")
    if overrides:
        fox = fox.replace(**dict(overrides))
    return fox

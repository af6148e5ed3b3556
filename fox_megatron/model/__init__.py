"""Megatron-Core integration of FoX attention: options, module, layer specs.

    from fox_megatron.model import FoxTransformerConfig, FoxConfig, build_fox_gpt_model
    model = build_fox_gpt_model(config, vocab_size, max_sequence_length)

Megatron-LM: ``--spec fox_megatron.model.spec fox_layer_spec``.
"""

from .attention import FoxSelfAttention, FoxSelfAttentionSubmodules
from .config import FoxConfig, FoxTransformerConfig, resolve_fox_config
from .norm import FoxNorm, HeadRMSNorm
from .spec import build_fox_gpt_model, get_fox_block_spec, get_fox_layer_spec
from .stats import acp_kept_fraction_per_layer, collect_acp_kept_fraction

__all__ = [
    "FoxConfig",
    "FoxNorm",
    "FoxSelfAttention",
    "FoxSelfAttentionSubmodules",
    "FoxTransformerConfig",
    "HeadRMSNorm",
    "acp_kept_fraction_per_layer",
    "build_fox_gpt_model",
    "collect_acp_kept_fraction",
    "get_fox_block_spec",
    "get_fox_layer_spec",
    "resolve_fox_config",
]

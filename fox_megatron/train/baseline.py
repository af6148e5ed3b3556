"""The standard-transformer baseline: Megatron's local layer spec with SDPA.

Megatron-Core's own DotProductAttention allocates its scratch buffer on the
current CUDA device and has no packed-sequence support, so the baseline's core
attention is torch's scaled_dot_product_attention instead: on the GPU it
dispatches to the cuDNN / flash kernels (the peer BENCH.md names), on the CPU
it runs the math kernel.  Everything else (QKV projection, RoPE, MLP, norms)
is Megatron's local spec unchanged, so only the attention differs from FoX.
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """[s, b, heads, d] q/k/v -> [s, b, heads * d], causal or masked.

    `attention_mask` follows Megatron's convention (True = masked out); the
    trainer passes a document-local causal mask for packed sequences and
    None otherwise (plain causal, which lets SDPA pick a flash kernel).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None, **_unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise NotImplementedError(
                "the baseline takes packed documents as an attention mask, not packed_seq_params"
            )
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not take an additive attention bias")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = True
        if attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = attend
            causal = False
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def baseline_layer_spec(normalization: str = "RMSNorm"):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def document_causal_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, 1, s, s] bool, True where a query must not see a key: later
    positions, and keys of an earlier document (after an EOD token)."""
    b, s = tokens.shape
    # Document id of each token: the number of EOD tokens strictly before it.
    is_eod = (tokens == eod).to(torch.int32)
    doc = torch.cumsum(is_eod, dim=1) - is_eod
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
    return ~(same_doc & causal)[:, None]


def make_rope_cpu_friendly(model) -> None:
    """Megatron's RotaryEmbedding moves its frequencies to the current CUDA
    device on first use; on a CPU run keep them where they are."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or torch.cuda.is_available():
        return

    def get_emb(self, max_seq_len: int, offset: int = 0):
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]

    rope.get_emb = types.MethodType(get_emb, rope)

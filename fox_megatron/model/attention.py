"""FoX (Pro) self-attention for Megatron-Core's TransformerLayer.

Per token x_t (hidden) and head h:

    q, k, v      = W_q x, W_k x, W_v x                (heads split over TP)
    k'_t         = a_t k_{t-1} + (1 - a_t) k_t,  a_t = sigmoid(w_a . x_t)
                   (and the same for v with its own gate)      [kv_shift]
    q, k         = RMSNorm_h(q), RMSNorm_h(k)                   [qk_norm]
    log f_t      = logsigmoid(w_f . x_t + b_f)          (fp32, always)
    o            = forgetting_attention(q, k, v, log f)    (+ ACP)
    o            = RMSNorm_h(o)                            [output_norm]
    o            = o * sigmoid(W_g x)                      [output_gate]
    y            = W_o o                             (RowParallelLinear)

Every projection of x (q, k, v, forget gate, shift gates, output gate) is
one ColumnParallelLinear, ``linear_in``.  Under sequence parallelism x
arrives split along the sequence and that layer all-gathers it: folding the
small gate projections into it means they see the gathered sequence too,
with one GEMM and one gather.  Its local output is laid out per TP rank as
[q | k | v | f | a_k | a_v | g], each part holding this rank's heads only,
so the sharded state dict splits the weight into one TP-sharded tensor per
part (the way Megatron-Core's gated delta net splits its fused in_proj) and
checkpoints reshard across TP sizes part by part.

Packed documents: ``packed_seq_params.cu_seqlens_q`` holds document starts
over the row-major flattening of (batch, sequence) tokens (sbhd layout kept,
as the kernel defines it).  With context parallelism (either cp_mode) they
index the global, unsplit rows.  The decay restarts at each document and the
token shift does not carry the last token of one document into the next.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, List, Mapping, Optional, Union

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from fox_megatron.kernels import AcpConfig, forgetting_attention, logit_bound_from_qk_norm

from .config import FoxConfig, resolve_fox_config
from .fused import (
    after_attention,
    at_least_fp32,
    before_attention,
    maybe_compiled,
    shift_tokens,
)
from .norm import HeadRMSNorm, param_device

__all__ = ["FoxSelfAttention", "FoxSelfAttentionSubmodules", "shift_tokens", "document_start_mask"]


@dataclass
class FoxSelfAttentionSubmodules:
    """Linear layers of the FoX attention (local or TE parallel linears)."""

    linear_in: Union[ModuleSpec, type] = ColumnParallelLinear
    linear_proj: Union[ModuleSpec, type] = RowParallelLinear


def document_start_mask(cu_seqlens: Optional[torch.Tensor], seqlen: int, batch: int, device) -> torch.Tensor:
    """[T, B] bool, True where a token opens a sequence (row start or document start).

    Built on the device from ``cu_seqlens`` (offsets over the row-major
    flattening of batch rows): no host sync.
    """
    starts = torch.zeros(batch * seqlen + 1, dtype=torch.bool, device=device)
    if cu_seqlens is not None:
        starts[cu_seqlens.to(device=device, dtype=torch.long)] = True
    starts = starts[:-1].view(batch, seqlen).t().contiguous()
    starts[0] = True
    return starts


class FoxSelfAttention(MegatronModule):
    """Forgetting attention (FoX Pro) as a Megatron-Core self-attention.

    Built by ``TransformerLayer`` through a ``ModuleSpec``; takes [s, b, h]
    (sequence-sharded under SP) and returns ``(output, bias)`` like
    Megatron's ``SelfAttention`` so the layer's bias-dropout-add applies.

    ``fox`` / ``fox_overrides`` (spec params) fix options for this layer;
    otherwise ``config.fox`` or the FOX_* environment decide
    (``resolve_fox_config``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[FoxSelfAttentionSubmodules] = None,
        layer_number: int = 1,
        attn_mask_type: Any = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        cp_comm_type: Optional[str] = None,
        fox: Optional[FoxConfig] = None,
        fox_overrides: Optional[Mapping[str, Any]] = None,
        **unused,
    ):
        super().__init__(config=config)
        submodules = submodules if submodules is not None else FoxSelfAttentionSubmodules()
        self.config = config
        self.layer_number = layer_number
        self.fox = fox.replace(**dict(fox_overrides or {})) if fox is not None else resolve_fox_config(config, fox_overrides)

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_size = tp
        cp_group = getattr(pg_collection, "cp", None)
        # context parallelism: the sequence arrives in Megatron's zigzag
        # layout and attention runs over the group (fox_megatron.context_parallel)
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.cp_stats = None

        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or config.num_attention_heads
        self.head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        if self.num_heads % tp or self.num_groups % tp:
            raise ValueError(
                f"attention heads ({self.num_heads}) and query groups ({self.num_groups}) "
                f"must be divisible by the tensor-parallel size ({tp})"
            )
        if self.num_heads % self.num_groups:
            raise ValueError(f"attention heads ({self.num_heads}) must be a multiple of query groups ({self.num_groups})")
        self.heads_local = self.num_heads // tp
        self.groups_local = self.num_groups // tp
        self.proj_size = self.num_heads * self.head_dim  # attention output width
        kv_size = self.num_groups * self.head_dim

        fox_ = self.fox
        # (name, global width) of every part of linear_in, in local order
        parts = [("query", self.proj_size), ("key", kv_size), ("value", kv_size), ("forget_gate", self.num_heads)]
        if fox_.kv_shift:
            parts += [("key_shift", self.num_groups), ("value_shift", self.num_groups)]
        if fox_.output_gate:
            parts += [("output_gate", self.proj_size)]
        self._parts = [(name, width // tp) for name, width in parts]
        in_size = sum(width for _, width in parts)

        self.linear_in = build_module(
            submodules.linear_in,
            config.hidden_size,
            in_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )
        # The forget gate always has a bias (FoX); the fused layer may not.
        self.forget_gate_bias = torch.nn.Parameter(
            torch.full(
                (self.heads_local,), float(fox_.forget_gate_bias_init),
                dtype=config.params_dtype, device=param_device(config),
            )
        )
        set_tensor_model_parallel_attributes(self.forget_gate_bias, True, 0, 1)

        if fox_.qk_norm:
            self.q_norm = HeadRMSNorm(config, self.heads_local, self.head_dim, eps=config.layernorm_epsilon)
            self.k_norm = HeadRMSNorm(config, self.groups_local, self.head_dim, eps=config.layernorm_epsilon)
        else:
            self.q_norm = self.k_norm = None
        self.out_norm = HeadRMSNorm(config, self.heads_local, self.head_dim, eps=config.layernorm_epsilon) if fox_.output_norm else None

        self.linear_proj = build_module(
            submodules.linear_proj,
            self.proj_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

        self.softmax_scale = (
            float(config.softmax_scale) if getattr(config, "softmax_scale", None) else 1.0 / math.sqrt(self.head_dim)
        )
        # Mean kept-tile fraction of the last forward (detached 0-dim tensor,
        # left on the device: reading it is the caller's choice of sync).
        self.acp_kept_fraction: Optional[torch.Tensor] = None
        self._warned_rope = False

    # ------------------------------------------------------------------ forward

    def _acp_config(self) -> Optional[AcpConfig]:
        if not self.fox.acp:
            return None
        bound = None
        if self.q_norm is not None:
            # RMS-normalised q and k: |s q.k| <= s d max|w_q| max|w_k| per head,
            # no pass over the activations.  RoPE rotates, so the bound holds.
            group = self.heads_local // self.groups_local
            kw = self.k_norm.weight.repeat_interleave(group, dim=0)
            bound = logit_bound_from_qk_norm(self.q_norm.weight, kw, self.softmax_scale)
        return AcpConfig(log_eps=self.fox.acp_log_eps, logit_bound=bound, min_seqlen=self.fox.acp_min_seqlen)

    def _apply_rope(self, q, k, rotary_pos_emb, packed_seq_params):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if isinstance(rotary_pos_emb, tuple):
            q_emb, k_emb = rotary_pos_emb
        else:
            q_emb = k_emb = rotary_pos_emb
        q = apply_rotary_pos_emb(q, q_emb, config=self.config)
        k = apply_rotary_pos_emb(k, k_emb, config=self.config)
        return q, k

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_value_states: Optional[torch.Tensor] = None,
        inference_context: Any = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        rotary_pos_cos_sin: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
        sequence_len_offset: Optional[int] = None,
        *,
        inference_params: Any = None,
        **kwargs,
    ):
        """[s, b, h] -> ((s, b, h) output, output bias or None).

        The mask is implied (causal, document-local); ``attention_mask`` is
        accepted and ignored, as is everything only inference uses.
        """
        if key_value_states is not None:
            raise NotImplementedError("FoxSelfAttention is self-attention only")
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("FoxSelfAttention has no KV-cache inference path")
        if attention_bias is not None:
            raise NotImplementedError("FoxSelfAttention does not take an additive attention bias")

        mixed, _ = self.linear_in(hidden_states)  # [T, B, in/tp], T the full sequence under SP
        T, B = mixed.shape[0], mixed.shape[1]
        pieces = dict(zip((n for n, _ in self._parts), torch.split(mixed, [w for _, w in self._parts], dim=-1)))
        Hq, Hk, D = self.heads_local, self.groups_local, self.head_dim
        q = pieces["query"].reshape(T, B, Hq, D)
        k = pieces["key"].reshape(T, B, Hk, D)
        v = pieces["value"].reshape(T, B, Hk, D)

        cu_seqlens = max_seqlen = None
        if packed_seq_params is not None:
            if getattr(packed_seq_params, "qkv_format", None) not in (None, "sbhd"):
                raise NotImplementedError(
                    f"FoxSelfAttention keeps the sbhd layout for packed documents; got qkv_format "
                    f"{packed_seq_params.qkv_format!r} (give cu_seqlens over the flattened batch rows)"
                )
            cu_seqlens = packed_seq_params.cu_seqlens_q
            max_seqlen = getattr(packed_seq_params, "max_seqlen_q", None)

        k_shift = v_shift = starts = None
        if self.fox.kv_shift and self.cp_group is not None:
            # the token before each local chunk lives on a neighbouring rank
            from fox_megatron.context_parallel import shift_tokens_cp, zigzag_slice

            starts = None
            if cu_seqlens is not None:
                # with CP, cu_seqlens index the global (unsplit) rows
                P = self.cp_group.size()
                starts = zigzag_slice(document_start_mask(cu_seqlens, T * P, B, mixed.device), 0,
                                      self.cp_group.rank(), P)
            k = shift_tokens_cp(k, torch.sigmoid(at_least_fp32(pieces["key_shift"])), self.cp_group, starts)
            v = shift_tokens_cp(v, torch.sigmoid(at_least_fp32(pieces["value_shift"])), self.cp_group, starts)
        elif self.fox.kv_shift:
            starts = document_start_mask(cu_seqlens, T, B, mixed.device)
            k_shift, v_shift = pieces["key_shift"], pieces["value_shift"]
        # shift, q/k norms and the log forget gate: one fused region (RoPE, if
        # any, rotates the normalised q and k after it)
        qn = self.q_norm.weight if self.q_norm is not None else None
        kn = self.k_norm.weight if self.k_norm is not None else None
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        q, k, v, log_fgate = self._fused(before_attention, mixed)(
            q, k, v, k_shift, v_shift, starts, qn, kn, eps, pieces["forget_gate"], self.forget_gate_bias)
        if rotary_pos_emb is not None:
            if self.fox.use_rope:
                q, k = self._apply_rope(q, k, rotary_pos_emb, packed_seq_params)
            elif not self._warned_rope:
                # A recipe that asks for RoPE gets FoX's own choice (none)
                # unless FoX is told otherwise: say so once.
                warnings.warn(
                    "FoxSelfAttention received a rotary embedding but FoX option use_rope is off; "
                    "ignoring it (set FOX_USE_ROPE=1 or FoxConfig(use_rope=True) to apply it)"
                )
                self._warned_rope = True
        elif self.fox.use_rope:
            raise ValueError("FoX option use_rope is on but the model passed no rotary embedding "
                             "(build the GPTModel with position_embedding_type='rope')")

        acp = self._acp_config()
        want_stats = acp is not None and self.fox.collect_acp_stats
        if self.cp_group is not None:
            o = self._cp_attention(q, k, v, log_fgate, acp, want_stats, cu_seqlens)
        else:
            result = forgetting_attention(
                q, k, v, log_fgate,
                layout="sbhd",
                cu_seqlens=cu_seqlens,
                # known on the host: the kernel then never waits for the GPU
                max_seqlen=max_seqlen if isinstance(max_seqlen, int) else None,
                softmax_scale=self.softmax_scale,
                acp=acp,
                backend=self.fox.attention_backend,
                return_stats=want_stats,
                precise_decay=self.fox.precise_decay,
            )
            if want_stats:
                o, stats = result
                self.acp_kept_fraction = stats.kept_tiles.detach().float().mean() if stats is not None else None
            else:
                o = result
                self.acp_kept_fraction = None

        o = self._fused(after_attention, mixed)(
            o, self.out_norm.weight if self.out_norm is not None else None,
            self.out_norm.eps if self.out_norm is not None else 0.0,
            pieces["output_gate"] if self.fox.output_gate else None,
        )
        return self.linear_proj(o)

    def _fused(self, fn, like):
        return maybe_compiled(fn, like, self.fox.fuse_elementwise)

    def _cp_attention(self, q, k, v, log_fgate, acp, want_stats, cu_seqlens):
        from fox_megatron.context_parallel import RingStats, cp_forgetting_attention

        ring = self.fox.cp_mode == "ring"
        self.cp_stats = RingStats() if ring else None
        o = cp_forgetting_attention(
            q, k, v, log_fgate,
            group=self.cp_group,
            mode=self.fox.cp_mode,
            layout="sbhd",
            softmax_scale=self.softmax_scale,
            acp=acp,
            backend=self.fox.attention_backend,
            stats=self.cp_stats,
            cu_seqlens=cu_seqlens,
            precise_decay=self.fox.precise_decay,
        )
        # Ring: the share of causal (key sub-block, query chunk, row, head)
        # work kept, the same on every rank (the skip table is global; it
        # counts whole sub-blocks, so it is coarser than the kernel's tiles);
        # Ulysses: not tracked.
        self.acp_kept_fraction = None
        if want_stats and ring:
            self.acp_kept_fraction = torch.tensor(self.cp_stats.kept_keys, device=q.device)
        return o

    # ------------------------------------------------------------ checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """Every tensor TP-sharded along its head axis, except the row-parallel
        output projection (sharded along its input) and its bias (replicated).

        ``linear_in.weight`` (and bias) is stored as one tensor per logical
        part (``linear_in.weight.query``, ``.key``, ..., ``.output_gate``), each
        the concatenation over TP ranks of that part: a checkpoint written at
        one TP size loads at another.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        dp_cp_group = metadata["dp_cp_group"]
        sd = make_sharded_tensors_for_checkpoint(
            {"forget_gate_bias": self.forget_gate_bias}, prefix, {"forget_gate_bias": 0},
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=dp_cp_group,
        )
        for name, module in self.named_children():
            if isinstance(module, HeadRMSNorm):
                sd.update(make_sharded_tensors_for_checkpoint(
                    {"weight": module.weight}, f"{prefix}{name}.", {"weight": 0},
                    sharded_offsets, tp_group=self.tp_group, dp_cp_group=dp_cp_group,
                ))
            else:
                sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))
        names = [n for n, _ in self._parts]
        widths = [w for _, w in self._parts]
        for tensor_name in ("weight", "bias"):
            key = f"{prefix}linear_in.{tensor_name}"
            if key in sd:
                sd[key] = _split_parts_factory(sd[key], widths, names)
        return sd


def _split_parts_factory(sh_ten: ShardedTensor, widths: List[int], names: List[str]) -> ShardedTensorFactory:
    """A factory storing the fused local tensor as one ShardedTensor per part.

    The local tensor on TP rank r is [part_0 of r | part_1 of r | ...] along
    dim 0, and the TP-sharded ShardedTensor says "rank r holds rows
    [r * n, (r + 1) * n) of a [tp * n] tensor".  Narrowing it to one part
    keeps the same grid, scaled to the part's width: rank r holds rows
    [r * w, (r + 1) * w) of a [tp * w] tensor -- exactly that part's global
    TP layout, so parts reshard independently.  Loading concatenates the
    parts back in local order.
    """
    if sum(widths) != sh_ten.local_shape[0]:
        raise ValueError(f"parts {dict(zip(names, widths))} do not cover the local rows {sh_ten.local_shape[0]}")
    template = sh_ten.without_data()

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        whole = replace(template, key=key, data=data, dtype=data.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        out = []
        start = 0
        for name, width in zip(names, widths):
            for piece in whole.narrow(0, start, width):
                piece.key = f"{key}.{name}"
                out.append(piece)
            start += width
        return out

    @torch.no_grad()
    def merge(loaded):
        return torch.cat(loaded)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)

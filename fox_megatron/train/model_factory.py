"""Build the GPTModel a run config describes.

`fox.enabled: true`: FoX (Pro) layers from fox_megatron.model (ACP per
`fox.acp`); `false`: the standard-transformer baseline (baseline.py).  Both
are megatron-core GPTModels built from a FoxTransformerConfig, so the rest of
the trainer does not care which one it holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def padded_vocab_size(cfg, tokenizer) -> int:
    """Megatron-LM's rule: round the tokenizer's vocabulary up to a multiple
    of make_vocab_size_divisible_by x TP, so the embedding splits evenly and
    its GEMMs get friendly shapes; an explicit vocab_size wins."""
    if cfg.vocab_size is not None:
        if cfg.vocab_size < tokenizer.vocab_size:
            raise SystemExit(
                f"vocab_size: {cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size})"
            )
        if cfg.vocab_size % cfg.tensor_model_parallel_size:
            raise SystemExit(
                f"vocab_size: {cfg.vocab_size} is not divisible by tensor_model_parallel_size "
                f"{cfg.tensor_model_parallel_size}"
            )
        return cfg.vocab_size
    multiple = cfg.make_vocab_size_divisible_by * cfg.tensor_model_parallel_size
    return int(math.ceil(tokenizer.vocab_size / multiple) * multiple)


def params_dtype(cfg) -> torch.dtype:
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    return torch.float32


def transformer_config(cfg, info):
    from fox_megatron.model import FoxConfig, FoxTransformerConfig

    on_cpu = not info.is_cuda
    fox = FoxConfig(
        acp=cfg.fox.enabled and cfg.fox.acp,
        acp_log_eps=cfg.fox.acp_log_eps,
        acp_min_seqlen=cfg.fox.acp_min_seqlen,
        qk_norm=cfg.fox.qk_norm,
        output_gate=cfg.fox.output_gate,
        output_norm=cfg.fox.output_norm,
        kv_shift=cfg.fox.kv_shift,
        forget_gate_bias_init=cfg.fox.forget_gate_bias_init,
        use_rope=cfg.fox.enabled and cfg.position_embedding_type == "rope",
        cp_mode=cfg.fox.cp_mode,
        precise_decay=cfg.fox.precise_decay,
    )
    dtype = params_dtype(cfg)
    return FoxTransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=cfg.add_bias_linear,
        init_method_std=cfg.init_method_std,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        # The loss is a sum over tokens, normalised once by the global token
        # count (Megatron-LM's per-token loss): micro-batches with different
        # numbers of unmasked tokens weigh what they contain.
        calculate_per_token_loss=True,
        # On CPU the full weight is drawn from the (shared) CPU generator and
        # split over TP; megatron-core's CUDA RNG tracker is not used.
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        # Fused kernels need CUDA (and some of them Apex / TE).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=cfg.pipeline_model_parallel_size > 1,
        fox=fox,
    )


def build_model(cfg, info, tokenizer):
    """The model for this rank (its pipeline stage), on the run's device."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg, info)
    vocab = padded_vocab_size(cfg, tokenizer)
    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    share = not cfg.untie_embeddings_and_output_weights
    if cfg.fox.enabled:
        from fox_megatron.model import build_fox_gpt_model

        model = build_fox_gpt_model(
            config,
            vocab_size=vocab,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=share,
            rotary_base=cfg.rotary_base,
        )
    else:
        from .baseline import baseline_layer_spec, make_rope_cpu_friendly

        model = GPTModel(
            config=config,
            transformer_layer_spec=baseline_layer_spec(cfg.normalization),
            vocab_size=vocab,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=share,
            position_embedding_type=cfg.position_embedding_type,
            rotary_base=cfg.rotary_base,
        )
        make_rope_cpu_friendly(model)
    model.to(info.device)
    return model, config


def count_parameters(model, info) -> int:
    """Parameters of the whole model (all TP and PP ranks, no DP copies).

    Tensor-parallel shards are summed over TP; replicated parameters (norms,
    biases of row-parallel layers) are counted once.  With PP the stages add.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    sharded = replicated = 0
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False):
            sharded += p.numel()
        else:
            replicated += p.numel()
    local = sharded + (replicated if info.tp_rank == 0 else 0)
    total = torch.tensor([local], dtype=torch.float64, device=info.device)
    if dist.is_initialized() and (info.tp > 1 or info.pp > 1):
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())

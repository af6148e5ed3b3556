"""Layer specs that put FoX attention into Megatron-Core's GPTModel.

* ``get_fox_layer_spec(...)``: a TransformerLayer spec (input norm, FoX
  attention, pre-MLP norm, Megatron's local MLP -- SwiGLU when the config
  says ``gated_linear_unit`` with ``silu``), built the way
  ``get_gpt_layer_local_spec`` builds Megatron's own.
* ``get_fox_block_spec(config, ...)``: the whole decoder block for one
  pipeline stage, with a final norm that works under sequence parallelism.
* ``build_fox_gpt_model(config, vocab_size, max_sequence_length, ...)``: the
  GPTModel, no positional embedding unless FoX asks for RoPE.

Megatron-LM drop-in.  ``pretrain_gpt.py --spec fox_megatron.model.spec
fox_layer_spec`` (or ``fox_layer_spec_no_acp``) imports the module-level
object and hands it to GPTModel as ``transformer_layer_spec``; the config is
Megatron-LM's own TransformerConfig, so FoX options come from defaults and
the FOX_* environment (``FoxConfig.from_env``).  Builders that call a
callable spec as ``spec(args, config, vp_stage)`` get a block spec instead.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import FoxSelfAttention, FoxSelfAttentionSubmodules
from .config import FoxConfig, resolve_fox_config
from .norm import FoxNorm

__all__ = [
    "get_fox_layer_spec",
    "get_fox_block_spec",
    "build_fox_gpt_model",
    "fox_layer_spec",
    "fox_layer_spec_no_acp",
]


def get_fox_layer_spec(fox: Optional[FoxConfig] = None, **fox_overrides: Any) -> ModuleSpec:
    """TransformerLayer spec with FoX (Pro) attention.

    fox: fixes every FoX option for these layers (otherwise the model
        config's ``fox`` field, or defaults + FOX_* environment, decide when
        the layer is built).
    fox_overrides: single options on top of that, e.g. ``acp=False``.
    """
    if fox_overrides:
        FoxConfig().replace(**fox_overrides)  # reject unknown names now, not at build time
    backend = LocalSpecProvider()
    params = {"attn_mask_type": AttnMaskType.causal}
    if fox is not None:
        params["fox"] = fox
    if fox_overrides:
        params["fox_overrides"] = dict(fox_overrides)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=FoxNorm,
            self_attention=ModuleSpec(
                module=FoxSelfAttention,
                params=params,
                submodules=FoxSelfAttentionSubmodules(
                    linear_in=backend.column_parallel_linear(),
                    linear_proj=backend.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=FoxNorm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_fox_block_spec(
    config: TransformerConfig,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    fox: Optional[FoxConfig] = None,
    **fox_overrides: Any,
) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage (and virtual stage).

    Unlike a bare layer spec (for which TransformerBlock picks its own final
    norm, Megatron's torch norm without TE, which refuses sequence
    parallelism), the final norm here is ``FoxNorm``.
    """
    layer = get_fox_layer_spec(fox, **fox_overrides)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=FoxNorm)


def build_fox_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pg_collection=None,
    parallel_output: bool = True,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    fox: Optional[FoxConfig] = None,
    **gpt_kwargs: Any,
):
    """GPTModel with FoX layers for this pipeline stage.

    pre_process / post_process default to "first / last pipeline stage" of
    ``pg_collection.pp`` (or Megatron's global state).  The positional
    embedding is "none" (FoX's forget gate carries position), or "rope" when
    the FoX options say ``use_rope``.  Further keywords go to GPTModel.
    """
    from megatron.core.models.gpt import GPTModel

    resolved = fox if fox is not None else resolve_fox_config(config)
    pp_rank, pp_size = _pipeline_position(pg_collection)
    if pre_process is None:
        pre_process = _stage_is(vp_stage, pp_rank, first=True, config=config, pp_size=pp_size)
    if post_process is None:
        post_process = _stage_is(vp_stage, pp_rank, first=False, config=config, pp_size=pp_size)
    block = get_fox_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank, fox=resolved)
    kwargs = dict(
        config=config,
        transformer_layer_spec=block,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope" if resolved.use_rope else "none",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    kwargs.update(gpt_kwargs)
    return GPTModel(**kwargs)


def _pipeline_position(pg_collection):
    group = getattr(pg_collection, "pp", None) if pg_collection is not None else None
    if group is not None:
        return group.rank(), group.size()
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_pipeline_model_parallel_rank(),
                parallel_state.get_pipeline_model_parallel_world_size())
    return 0, 1


def _stage_is(vp_stage, pp_rank, *, first: bool, config, pp_size: int) -> bool:
    vp_size = getattr(config, "virtual_pipeline_model_parallel_size", None)
    if first:
        return pp_rank == 0 and (vp_stage is None or vp_size is None or vp_stage == 0)
    return pp_rank == pp_size - 1 and (vp_stage is None or vp_size is None or vp_stage == vp_size - 1)


class _CommandLineSpec(ModuleSpec):
    """The layer spec object that ``--spec <module> <name>`` imports.

    Megatron-LM's gpt builder uses the imported object as the layer spec
    as is.  Some builders derived from it call a callable spec as
    ``spec(args, config, vp_stage)`` to get the spec; a ModuleSpec is
    callable already (it builds its module), so a call whose first argument
    is an argparse namespace is answered with a block spec for that config,
    and any other call builds the module as before.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], argparse.Namespace):
            config = args[1] if len(args) > 1 else kwargs.get("config")
            vp_stage = args[2] if len(args) > 2 else kwargs.get("vp_stage")
            if config is None:
                return self
            return get_fox_block_spec(config, vp_stage=vp_stage, **self.metainfo.get("fox_overrides", {}))
        return super().__call__(*args, **kwargs)


def _command_line_spec(**fox_overrides: Any) -> _CommandLineSpec:
    spec = get_fox_layer_spec(**fox_overrides)
    return _CommandLineSpec(
        module=spec.module, params=spec.params, submodules=spec.submodules,
        metainfo={"fox_overrides": dict(fox_overrides)},
    )


# --spec fox_megatron.model.spec fox_layer_spec          FoX (Pro) + ACP
fox_layer_spec = _command_line_spec()
# --spec fox_megatron.model.spec fox_layer_spec_no_acp   FoX (Pro), no pruning
fox_layer_spec_no_acp = _command_line_spec(acp=False)

"""FoX layer spec in Megatron-Core's GPTModel, single process on CPU."""

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from fox_dist_common import batch, init_parallel, small_config  # noqa: E402

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, import_module  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402

from fox_megatron.model import (  # noqa: E402
    FoxConfig,
    FoxSelfAttention,
    FoxTransformerConfig,
    build_fox_gpt_model,
    collect_acp_kept_fraction,
    get_fox_layer_spec,
    resolve_fox_config,
)
from fox_megatron.model.stats import acp_kept_fraction_per_layer  # noqa: E402

VOCAB, SEQ = 128, 48


@pytest.fixture(autouse=True)
def _parallel():
    init_parallel(1, 1)


def _megatron_lm_build(spec, config):
    """GPTModel exactly as Megatron-LM's gpt_builder passes it (arguments
    taken from a default pretrain_gpt command line plus --spec)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=True,
        post_process=True,
        fp16_lm_cross_entropy=False,
        parallel_output=True,
        share_embeddings_and_output_weights=True,
        position_embedding_type="none",
        rotary_percent=1.0,
        rotary_base=10000,
        rope_scaling=False,
        mtp_block_spec=None,
        vp_stage=None,
        pg_collection=None,
    )


def test_drop_in_spec_from_plain_transformer_config():
    spec = import_module(("fox_megatron.model.spec", "fox_layer_spec"))
    assert isinstance(spec, ModuleSpec)
    torch.manual_seed(0)
    model = _megatron_lm_build(spec, small_config())
    attn = [m for m in model.modules() if isinstance(m, FoxSelfAttention)]
    assert len(attn) == 2 and all(a.fox == FoxConfig() for a in attn)
    tokens, labels, pos = batch(VOCAB, SEQ, 2)
    loss = model(tokens, pos, None, labels=labels)
    assert loss.shape == (2, SEQ) and loss.dtype == torch.float32
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every FoX-specific parameter learns something
    for a in attn:
        assert a.forget_gate_bias.grad.abs().sum() > 0
        assert a.q_norm.weight.grad.abs().sum() > 0
    assert collect_acp_kept_fraction(model) is not None


def test_drop_in_spec_no_acp():
    spec = import_module(("fox_megatron.model.spec", "fox_layer_spec_no_acp"))
    model = _megatron_lm_build(spec, small_config(num_layers=1))
    attn = next(m for m in model.modules() if isinstance(m, FoxSelfAttention))
    assert attn.fox.acp is False
    tokens, labels, pos = batch(VOCAB, SEQ, 1)
    model(tokens, pos, None, labels=labels).mean().backward()
    assert collect_acp_kept_fraction(model) is None


def test_drop_in_spec_called_like_a_builder_function():
    # some builders call a callable spec as spec(args, config, vp_stage)
    from fox_megatron.model.spec import fox_layer_spec

    cfg = small_config(num_layers=3)
    block = fox_layer_spec(argparse.Namespace(), cfg, None)
    assert isinstance(block, TransformerBlockSubmodules) and len(block.layer_specs) == 3
    model = _megatron_lm_build(block, cfg)
    tokens, labels, pos = batch(VOCAB, 16, 1)
    model(tokens, pos, None, labels=labels).mean().backward()


def test_environment_overrides_plain_config(monkeypatch):
    monkeypatch.setenv("FOX_ACP", "0")
    monkeypatch.setenv("FOX_ACP_LOG_EPS", "-7.5")
    monkeypatch.setenv("FOX_KV_SHIFT", "off")
    fox = resolve_fox_config(small_config())
    assert (fox.acp, fox.acp_log_eps, fox.kv_shift, fox.qk_norm) == (False, -7.5, False, True)
    # spec overrides win over the environment
    assert resolve_fox_config(small_config(), {"acp": True}).acp is True
    monkeypatch.setenv("FOX_QK_NORM", "maybe")
    with pytest.raises(ValueError, match="FOX_QK_NORM"):
        resolve_fox_config(small_config())
    monkeypatch.delenv("FOX_QK_NORM")
    monkeypatch.setenv("FOX_ACP_MIN_SEQLEN", "1024")
    assert resolve_fox_config(small_config()).acp_min_seqlen == 1024
    monkeypatch.setenv("FOX_ACP_MIN_SEQLEN", "1k")
    with pytest.raises(ValueError, match="FOX_ACP_MIN_SEQLEN"):
        resolve_fox_config(small_config())


def test_fox_transformer_config_wins_over_environment(monkeypatch):
    monkeypatch.setenv("FOX_ACP", "0")
    cfg = small_config(FoxTransformerConfig, fox=FoxConfig(acp=True, output_gate=False))
    assert resolve_fox_config(cfg).acp is True
    cfg2 = small_config(FoxTransformerConfig, fox={"kv_shift": False})  # dict, e.g. from YAML
    assert cfg2.fox == FoxConfig(kv_shift=False)


def test_unknown_override_rejected():
    with pytest.raises(TypeError, match="unknown FoX option"):
        get_fox_layer_spec(acp_eps=-3)


@pytest.mark.parametrize(
    "fox",
    [
        FoxConfig.basic(),
        FoxConfig(kv_shift=False),
        FoxConfig(output_gate=False, output_norm=False),
        # Megatron's RotaryEmbedding moves its frequencies to CUDA
        pytest.param(FoxConfig(use_rope=True), marks=pytest.mark.gpu),
    ],
    ids=["basic", "no_shift", "no_output_gate_norm", "rope"],
)
def test_build_fox_gpt_model_feature_switches(fox):
    on_gpu = fox.use_rope  # Megatron's rotary embedding lives on CUDA
    cfg = small_config(FoxTransformerConfig, fox=fox, num_layers=1, num_query_groups=2, use_cpu_initialization=not on_gpu)
    model = build_fox_gpt_model(cfg, VOCAB, SEQ)
    assert model.position_embedding_type == ("rope" if fox.use_rope else "none")
    attn = next(m for m in model.modules() if isinstance(m, FoxSelfAttention))
    assert (attn.q_norm is not None) == fox.qk_norm and (attn.out_norm is not None) == fox.output_norm
    tokens, labels, pos = (t.cuda() if on_gpu else t for t in batch(VOCAB, SEQ, 2))
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_acp_stats_per_layer_prunes_long_decay():
    # strongly forgetting gates (bias -4: f ~ 0.018) make most tiles prunable
    cfg = small_config(FoxTransformerConfig, fox=FoxConfig(forget_gate_bias_init=-4.0), num_layers=2)
    model = build_fox_gpt_model(cfg, VOCAB, 512)
    tokens, labels, pos = batch(VOCAB, 512, 1)
    with torch.no_grad():
        model(tokens, pos, None, labels=labels)
    per_layer = acp_kept_fraction_per_layer(model)
    assert sorted(per_layer) == [1, 2]
    kept = collect_acp_kept_fraction(model)
    assert kept.dim() == 0 and not kept.requires_grad
    assert 0.0 < float(kept) < 0.6

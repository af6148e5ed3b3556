"""ACP on vs off in a tiny FoX GPT: the loss moves by no more than the
bound that eps implies.

Per query, ACP drops keys whose total attention weight m is at most eps
(Lin et al., ACP, COLM 2025).  With S_k the kept and S_p the dropped part of
o = S_k + S_p, the pruned output is S_k / (1 - m), so every element obeys

    |o_acp - o| = |m S_k / (1 - m) - S_p| <= 2 m max|v| <= 2 eps max|v|.

Layer 1 sees the same input with and without ACP, so this holds there
exactly.  For the loss, to first order

    |L_acp - L| <= sum_layers sum_elements |dL/do| * 2 eps max|v|,

checked with a factor 2 of slack for higher-order terms.
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from fox_dist_common import batch, init_parallel, small_config  # noqa: E402

import fox_megatron.model.attention as attention_module  # noqa: E402
from fox_megatron.model import FoxConfig, FoxTransformerConfig, build_fox_gpt_model  # noqa: E402
from fox_megatron.model.stats import acp_kept_fraction_per_layer, collect_acp_kept_fraction  # noqa: E402

VOCAB, SEQ = 96, 320
LOG_EPS = -10.0  # the default


@pytest.fixture(autouse=True)
def _parallel():
    init_parallel(1, 1)


class _Recorder:
    """Wraps forgetting_attention to keep each call's output (with its
    gradient) and max|v|."""

    def __init__(self, fn):
        self.fn, self.outputs, self.vmax = fn, [], []

    def __call__(self, q, k, v, log_fgate, **kw):
        res = self.fn(q, k, v, log_fgate, **kw)
        o = res[0] if isinstance(res, tuple) else res
        if o.requires_grad:
            o.retain_grad()
        self.outputs.append(o)
        self.vmax.append(v.detach().abs().max().item())
        return res


def _run(model, monkeypatch):
    rec = _Recorder(attention_module.forgetting_attention)
    monkeypatch.setattr(attention_module, "forgetting_attention", rec)
    tokens, labels, pos = batch(VOCAB, SEQ, 1, seed=11)
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    return loss.item(), rec


def _model(acp: bool):
    fox = FoxConfig(acp=acp, acp_log_eps=LOG_EPS)
    cfg = small_config(FoxTransformerConfig, fox=fox, num_layers=2, params_dtype=torch.float64, init_method_std=0.2)
    torch.manual_seed(21)
    return build_fox_gpt_model(cfg, VOCAB, SEQ)


def test_acp_loss_within_eps_bound(monkeypatch):
    off = _model(acp=False)
    on = _model(acp=True)
    on.load_state_dict(off.state_dict())
    loss_off, rec_off = _run(off, monkeypatch)
    loss_on, rec_on = _run(on, monkeypatch)

    eps = math.exp(LOG_EPS)
    kept = acp_kept_fraction_per_layer(on)
    assert len(kept) == 2 and float(collect_acp_kept_fraction(on)) < 0.9, kept  # ACP did prune
    assert not acp_kept_fraction_per_layer(off)

    # layer 1: identical inputs, elementwise bound
    d1 = (rec_on.outputs[0] - rec_off.outputs[0]).abs().max().item()
    assert d1 <= 2 * eps * rec_off.vmax[0] * (1 + 1e-9)
    # and pruning really changed something (the test is not vacuous)
    assert d1 > 0

    bound = sum(
        o.grad.abs().sum().item() * 2 * eps * vmax for o, vmax in zip(rec_off.outputs, rec_off.vmax)
    )
    assert abs(loss_on - loss_off) <= 2 * bound, (loss_on, loss_off, bound)

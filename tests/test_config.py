"""The run config: loading, overrides, derived values and every validation rule."""

from pathlib import Path

import pytest
import yaml

from fox_megatron.config import (
    ConfigError,
    RunConfig,
    all_keys,
    config_from_dict,
    dump_config,
    load_config,
    parse_scalar,
    resolve_run_paths,
    validate,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))

# A small valid CPU config; each test breaks one rule of it.
BASE = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 256,
    "micro_batch_size": 2,
    "global_batch_size": 8,
    "train_iters": 10,
    "mock_data": True,
    "launch": {"device": "cpu", "nproc_per_node": 2},
}


def make(**changes) -> RunConfig:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)


def error_of(world_size=None, check_files=True, **changes) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(make(**changes), world_size=world_size, check_files=check_files)
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    return info.value


def test_base_is_valid():
    validate(make())


# --- every shipped config loads and validates against its own launch block ---


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    validate(cfg, world_size=cfg.launch.nnodes * cfg.launch.nproc_per_node, check_files=False)


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    sizes = ["125m_4k", "125m_16k", "360m_16k", "760m_4k", "760m_16k", "1p3b", "7b"]
    expected = {"demo.yaml"} | {f"fox_pro_{s}.yaml" for s in sizes} | {f"transformer_{s}.yaml" for s in sizes}
    assert expected <= names


def test_demo_is_a_small_cpu_fox_acp_run():
    cfg = load_config(CONFIGS[0].parent / "demo.yaml")
    assert cfg.launch.device == "cpu" and cfg.launch.nproc_per_node == 2
    assert cfg.fox.enabled and cfg.fox.acp
    assert cfg.num_layers <= 2 and cfg.hidden_size <= 128 and cfg.seq_length <= 256
    assert 50 <= cfg.train_iters <= 100
    validate(cfg)  # mock data: no files needed


def test_baselines_match_fox_sizes():
    for fox_path in (p for p in CONFIGS if p.name.startswith("fox_pro_")):
        base_path = fox_path.with_name(fox_path.name.replace("fox_pro_", "transformer_"))
        fox, base = load_config(fox_path), load_config(base_path)
        assert fox.fox.enabled and fox.fox.acp and fox.position_embedding_type == "none"
        assert not base.fox.enabled and base.position_embedding_type == "rope"
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "seq_length", "global_batch_size", "train_iters", "lr"):
            assert getattr(fox, key) == getattr(base, key), (fox_path.name, key)


# --- loading, derived values, overrides ---


def test_derived_values():
    cfg = make()
    assert cfg.ffn_hidden_size == 256  # 3.5 * 64 = 224 -> next multiple of 64
    assert cfg.kv_channels == 16
    assert cfg.position_embedding_type == "none"
    assert cfg.max_position_embeddings == 256
    assert cfg.lr_decay_iters == 10
    assert make(hidden_size=768, num_attention_heads=12).ffn_hidden_size == 2688
    assert make(swiglu=False).ffn_hidden_size == 256  # 4 x hidden
    assert make(fox__enabled=False).position_embedding_type == "rope"
    assert make(ffn_hidden_size=100).ffn_hidden_size == 100


def test_yaml_numbers_follow_yaml_1_2(tmp_path):
    # PyYAML alone reads 1e-3 as a string and 04:00:00 as 14400.
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\nmock_data: true\nlaunch:\n  slurm:\n    time: 04:00:00\n")
    cfg = load_config(p)
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.launch.slurm.time == "04:00:00"
    assert parse_scalar("3") == 3 and parse_scalar("true") is True and parse_scalar("") is None
    assert parse_scalar("[a, b]") == ["a", "b"] and parse_scalar("1.5") == 1.5


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["train_iters=5", "lr=2e-4", "fox.acp=true", "launch.slurm.partition=gpu",
                          "launch.env.NCCL_DEBUG=INFO", "data_path=[0.3, a, 0.7, b]", "save="])
    assert cfg.train_iters == 5 and cfg.lr == pytest.approx(2e-4) and cfg.fox.acp
    assert cfg.launch.slurm.partition == "gpu" and cfg.launch.env == {"NCCL_DEBUG": "INFO"}
    assert cfg.data_path == [0.3, "a", 0.7, "b"] and cfg.save is None
    assert cfg.launch.nproc_per_node == 2  # untouched keys keep the file's value


def test_override_unknown_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=r"^fox\.acpp: unknown key \(did you mean 'fox\.acp'\?\)"):
        load_config(p, ["fox.acpp=true"])
    with pytest.raises(ConfigError, match=r"^acp: unknown key \(did you mean 'fox\.acp'\?\)"):
        load_config(p, ["acp=true"])
    with pytest.raises(ConfigError, match=r"^train_iters: an override must look like key=value"):
        load_config(p, ["train_iters"])


def test_override_into_scalar_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**BASE, "launch": {"slurm": None}}))
    cfg = load_config(p, ["launch.slurm.time=1:00:00"])  # null block becomes a block
    assert cfg.launch.slurm.time == "1:00:00"


def test_dump_round_trip(tmp_path):
    cfg = make(fox__acp=True)
    resolve_run_paths(cfg, "x", cwd=tmp_path)
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()


def test_resolve_run_paths(tmp_path):
    cfg = make(save="ckpt", load="/abs/ckpt", data_path=["data/a"], mock_data=False)
    resolve_run_paths(cfg, "demo", cwd=tmp_path)
    assert cfg.launch.run_dir == str(tmp_path / "runs" / "demo")
    assert cfg.save == str(tmp_path / "runs" / "demo" / "ckpt")  # outputs: inside the run dir
    assert cfg.load == "/abs/ckpt"
    assert cfg.data_path == [str(tmp_path / "data" / "a")]  # inputs: relative to cwd
    assert cfg.metrics_file == str(tmp_path / "runs" / "demo" / "metrics.jsonl")
    before = cfg.to_dict()
    resolve_run_paths(cfg, "other", cwd="/elsewhere")
    assert cfg.to_dict() == before  # idempotent


def test_all_keys_lists_blocks():
    keys = set(all_keys())
    assert {"num_layers", "fox.acp", "launch.nproc_per_node", "launch.slurm.partition"} <= keys


def test_derived_sizes():
    cfg = make(tensor_model_parallel_size=2, global_batch_size=8)
    assert cfg.world_size == 2 and cfg.data_parallel_size() == 1 and cfg.num_microbatches() == 4
    assert cfg.data_parallel_size(world_size=8) == 4


# --- type and key errors (at load time) ---


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"^hiden_size: unknown key \(did you mean 'hidden_size'\?\)"):
        make(hiden_size=64)


def test_unknown_nested_key():
    with pytest.raises(ConfigError, match=r"^launch\.slurm\.partiton: unknown key .*launch\.slurm\.partition"):
        make(launch__slurm__partiton="gpu")


def test_wrong_type_int():
    with pytest.raises(ConfigError, match=r"^num_layers: expected int, got 'two'"):
        make(num_layers="two")


def test_wrong_type_bool():
    with pytest.raises(ConfigError, match=r"^fox\.acp: expected bool, got 1"):
        make(fox__acp=1)


def test_wrong_type_float():
    with pytest.raises(ConfigError, match=r"^lr: expected float"):
        make(lr="fast")


def test_wrong_choice():
    with pytest.raises(ConfigError, match=r"^lr_decay_style: must be one of .*'cosine'.*got 'cos'"):
        make(lr_decay_style="cos")


def test_wrong_block_type():
    with pytest.raises(ConfigError, match=r"^fox: expected mapping"):
        make(fox=True)


def test_bad_env_value():
    with pytest.raises(ConfigError, match=r"^launch\.env\.X: expected a string"):
        make(launch__env={"X": [1]})


def test_float_accepts_int_and_int_accepts_whole_float():
    assert make(lr=1).lr == 1.0
    assert make(train_iters=1e3).train_iters == 1000


# --- cross-key rules (validate) ---


def test_positive_sizes():
    assert error_of(num_layers=0).key == "num_layers"


def test_heads_divide_hidden():
    e = error_of(num_attention_heads=5, hidden_size=64)
    assert e.key == "num_attention_heads" and "not divisible" in str(e)


def test_heads_not_divisible_by_tp():
    e = error_of(num_attention_heads=4, tensor_model_parallel_size=8, launch__nproc_per_node=8)
    assert e.key == "tensor_model_parallel_size"
    assert str(e).startswith("tensor_model_parallel_size: num_attention_heads 4 is not divisible")


def test_query_groups_not_divisible_by_tp():
    e = error_of(num_attention_heads=8, num_query_groups=2, tensor_model_parallel_size=4,
                 launch__nproc_per_node=4, global_batch_size=8)
    assert e.key == "num_query_groups" and "tensor_model_parallel_size 4" in str(e)


def test_heads_not_divisible_by_query_groups():
    e = error_of(num_query_groups=3)
    assert e.key == "num_query_groups"


def test_ffn_not_divisible_by_tp():
    e = error_of(ffn_hidden_size=100, tensor_model_parallel_size=8, num_attention_heads=8,
                 launch__nproc_per_node=8)
    assert e.key == "ffn_hidden_size"


def test_layers_not_divisible_by_pp():
    e = error_of(num_layers=3, pipeline_model_parallel_size=2, launch__device="cuda")
    assert e.key == "pipeline_model_parallel_size" and "num_layers 3" in str(e)


def test_seq_length_not_divisible_for_cp():
    e = error_of(seq_length=192, context_parallel_size=2, launch__nproc_per_node=2)
    assert e.key == "seq_length" and "2 x context_parallel_size x 64 = 256" in str(e)


def test_seq_length_any_without_cp():
    validate(make(seq_length=100))


def test_ulysses_heads_per_rank():
    e = error_of(context_parallel_size=8, seq_length=1024, num_attention_heads=4, fox__cp_mode="ulysses",
                 launch__nproc_per_node=8)
    assert e.key == "fox.cp_mode"


def test_world_size_not_divisible():
    e = error_of(tensor_model_parallel_size=2, launch__nproc_per_node=3)
    assert e.key == "launch.nproc_per_node" and "world size 3" in str(e)


def test_world_size_given_explicitly():
    e = error_of(world_size=6, tensor_model_parallel_size=4)
    assert e.key == "world_size" and "world size 6" in str(e)


def test_global_batch_not_divisible():
    e = error_of(global_batch_size=6, micro_batch_size=2)  # DP 2 -> multiple of 4 needed
    assert e.key == "global_batch_size" and "2 x 2 = 4" in str(e)


def test_sequence_parallel_needs_tp():
    e = error_of(sequence_parallel=True, launch__device="cuda")
    assert e.key == "sequence_parallel" and "tensor_model_parallel_size > 1" in str(e)


def test_max_restarts():
    validate(make(launch__max_restarts=2, save="ckpt"))
    assert error_of(launch__max_restarts=-1, save="ckpt").key == "launch.max_restarts"
    # restarted workers resume from save: without it every restart starts over
    err = error_of(launch__max_restarts=1)
    assert err.key == "launch.max_restarts" and "save" in str(err)
    many = dict(launch__max_restarts=1, save="ckpt", launch__nnodes=2, world_size=4)
    validate(make(**{k: v for k, v in many.items() if k != "world_size"}), world_size=4)
    # a static rendezvous leaves the failed workers' addresses to the restarted ones
    assert error_of(launch__rdzv_backend="static", **many).key == "launch.rdzv_backend"
    assert error_of(launch__rdzv_backend="static", launch__max_restarts=1, save="c").key == "launch.rdzv_backend"


def test_distributed_timeout_minutes():
    assert make().distributed_timeout_minutes == 30
    assert error_of(distributed_timeout_minutes=0).key == "distributed_timeout_minutes"


def test_missing_data_files(tmp_path):
    e = error_of(mock_data=False, data_path=[str(tmp_path / "corpus")])
    assert e.key == "data_path[0]" and "corpus.bin does not exist" in str(e)


def test_missing_idx_file(tmp_path):
    (tmp_path / "corpus.bin").write_bytes(b"")
    e = error_of(mock_data=False, data_path=[0.5, str(tmp_path / "corpus"), 0.5, str(tmp_path / "corpus")])
    assert e.key == "data_path[1]" and "corpus.idx does not exist" in str(e)


def test_data_files_present(tmp_path):
    for ext in (".bin", ".idx"):
        (tmp_path / f"corpus{ext}").write_bytes(b"")
    validate(make(mock_data=False, data_path=[str(tmp_path / "corpus")]))


def test_data_files_not_checked_when_asked():
    validate(make(mock_data=False, data_path=["/nonexistent/corpus"]), check_files=False)


def test_no_data():
    e = error_of(mock_data=False)
    assert e.key == "data_path"


def test_weighted_data_path_needs_pairs():
    e = error_of(mock_data=False, data_path=[0.5, "a", 0.5], check_files=False)
    assert e.key == "data_path"


def test_hf_tokenizer_needs_model():
    e = error_of(tokenizer_type="HuggingFaceTokenizer")
    assert e.key == "tokenizer_model"


def test_hf_tokenizer_missing(tmp_path):
    e = error_of(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "nope"))
    assert e.key == "tokenizer_model" and "does not exist" in str(e)


def test_fp16_and_bf16():
    e = error_of(fp16=True, bf16=True, launch__device="cuda")
    assert e.key == "fp16" and "both" in str(e)


def test_cpu_refuses_bf16():
    e = error_of(bf16=True)
    assert e.key == "bf16" and "cpu" in str(e)


def test_cpu_refuses_distributed_optimizer():
    assert error_of(use_distributed_optimizer=True).key == "use_distributed_optimizer"


def test_cpu_refuses_pipeline():
    assert error_of(pipeline_model_parallel_size=2).key == "pipeline_model_parallel_size"


def test_cpu_refuses_sequence_parallel():
    e = error_of(sequence_parallel=True, tensor_model_parallel_size=2, num_attention_heads=4)
    assert e.key == "sequence_parallel" and "cpu" in str(e)


def test_acp_needs_fox():
    e = error_of(fox__acp=True, fox__enabled=False)
    assert e.key == "fox.acp" and "fox.enabled" in str(e)


def test_acp_eps_negative():
    assert error_of(fox__acp_log_eps=1.0).key == "fox.acp_log_eps"


def test_acp_min_seqlen():
    from types import SimpleNamespace

    from fox_megatron.train.model_factory import transformer_config

    assert error_of(fox__acp_min_seqlen=-1).key == "fox.acp_min_seqlen"
    cfg = make(fox__acp_min_seqlen=1024)
    validate(cfg)
    assert transformer_config(cfg, SimpleNamespace(is_cuda=False)).fox.acp_min_seqlen == 1024


def test_min_lr_above_lr():
    assert error_of(lr=1e-4, min_lr=1e-3).key == "min_lr"


def test_warmup_longer_than_decay():
    assert error_of(lr_warmup_iters=20).key == "lr_warmup_iters"


def test_wsd_needs_decay_iters():
    assert error_of(lr_decay_style="WSD").key == "lr_wsd_decay_iters"


def test_wsd_decay_too_long():
    assert error_of(lr_decay_style="WSD", lr_wsd_decay_iters=50).key == "lr_wsd_decay_iters"


def test_beta_range():
    assert error_of(adam_beta2=1.0).key == "adam_beta2"


def test_bad_split():
    assert error_of(split="90/10").key == "split"


def test_eod_token_in_vocab():
    assert error_of(eod_token=300, vocab_size=256).key == "eod_token"


def test_save_interval_needs_save():
    e = error_of(save_interval=5)
    assert e.key == "save" and "save_interval" in str(e)


def test_bad_port():
    assert error_of(launch__master_port=70000).key == "launch.master_port"


def test_bad_nnodes():
    assert error_of(launch__nnodes=0).key == "launch.nnodes"


def test_bad_rdzv_endpoint():
    assert error_of(launch__rdzv_endpoint="a b:1").key == "launch.rdzv_endpoint"


def test_bad_env_name():
    assert error_of(launch__env={"1BAD": "x"}).key == "launch.env.1BAD"


def test_bad_slurm_time():
    assert error_of(launch__slurm__time="four hours").key == "launch.slurm.time"


def test_ulysses_counts_key_value_heads():
    # 8 query heads but 2 key/value groups: the all-to-all cannot split KV over CP = 4
    e = error_of(context_parallel_size=4, seq_length=1024, num_attention_heads=8, num_query_groups=2,
                 fox__cp_mode="ulysses", launch__nproc_per_node=4)
    assert e.key == "fox.cp_mode" and "2 key/value heads" in str(e)
    validate(make(context_parallel_size=2, seq_length=1024, num_attention_heads=8, num_query_groups=2,
                  fox__cp_mode="ulysses", launch__nproc_per_node=2))


def test_cp_mode_reaches_the_model_config():
    from types import SimpleNamespace

    from fox_megatron.train.model_factory import transformer_config

    cfg = make(context_parallel_size=2, seq_length=1024, fox__cp_mode="ulysses", launch__nproc_per_node=2)
    validate(cfg)
    tc = transformer_config(cfg, SimpleNamespace(is_cuda=False))
    assert tc.fox.cp_mode == "ulysses" and tc.context_parallel_size == 2

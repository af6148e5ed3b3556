"""The run configuration: one typed tree, loaded from YAML, validated in one place.

Flat keys carry Megatron-LM's argument names (``--num-layers`` becomes
``num_layers``) so a Megatron user recognises them; FoX options live in a
``fox:`` block and everything about starting processes in a ``launch:`` block.

This module imports only the standard library and PyYAML: the launcher uses it
on login nodes that have no torch (and no GPU).

    cfg = load_config("configs/demo.yaml", ["train_iters=20", "fox.acp=false"])
    validate(cfg)                       # raises ConfigError("key: why")
    dump_config(cfg, "runs/demo/config.yaml")

Derived values (filled in by ``load_config`` when the YAML leaves them null,
so the resolved file the trainer reads is explicit):

- ``ffn_hidden_size``: with SwiGLU, 3.5 x hidden_size rounded up to a multiple
  of 64 (the FoX paper's MLP ratio, which pays for the extra gate
  parameters); without SwiGLU, 4 x hidden_size (Megatron's default).
- ``kv_channels``: hidden_size / num_attention_heads.
- ``num_query_groups``: stays null, meaning one group per head (MHA).
- ``position_embedding_type``: ``none`` for FoX (the forget gate already
  encodes position), ``rope`` for the standard-transformer baseline.
- ``max_position_embeddings``: seq_length.
- ``lr_decay_iters``: train_iters.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "FoxConfig",
    "SlurmConfig",
    "LaunchConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "dump_config",
    "resolve_run_paths",
    "validate",
    "parse_scalar",
    "all_keys",
    "ATTENTION_BLOCK",
]

# Query/key tile of the forgetting-attention kernels. Context parallelism cuts
# the sequence into 2 x CP zigzag chunks, and each chunk must hold whole tiles.
ATTENTION_BLOCK = 64


class ConfigError(ValueError):
    """An invalid configuration. The message is one line: ``key: reason``."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


@dataclass
class FoxConfig:
    """FoX attention options (ignored by the standard-transformer baseline)."""

    # false: standard transformer baseline (RoPE + softmax attention, SDPA).
    enabled: bool = True
    # Adaptive Computation Pruning: skip tiles whose decay bound is below the
    # threshold. THE switch for ACP.
    acp: bool = False
    # log of the attention mass each query may lose to pruning (eps = e^-10).
    acp_log_eps: float = -10.0
    # Prune only when the longest document of a call has at least this many
    # tokens (0: always). Short documents leave little to prune: at 512
    # tokens ACP made the attention step up to 12% slower on an H200, at
    # 1024 it was faster. The context-parallel ring does not use it.
    acp_min_seqlen: int = 0
    # FoX (Pro) components.
    qk_norm: bool = True
    output_gate: bool = True
    output_norm: bool = True
    kv_shift: bool = True
    # Initial bias of the forget gate (0: plain zero init, as in the paper).
    forget_gate_bias_init: float = 0.0
    # Context-parallel attention when context_parallel_size > 1.
    cp_mode: Literal["ring", "ulysses"] = "ring"
    # Cumulative decay in float64 (exact for long documents with
    # fast-forgetting heads; costs 4-15% of the attention step).
    precise_decay: bool = False


@dataclass
class SlurmConfig:
    """#SBATCH settings. Null entries are left out of the script."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # SLURM time limit, e.g. "04:00:00" or "2-00:00:00".
    time: Optional[str] = None
    # Null: "fox-<config name>".
    job_name: Optional[str] = None
    # Null: <run_dir>/slurm-%j.out; error null: stderr goes to the output file.
    output: Optional[str] = None
    error: Optional[str] = None
    # Null: nproc_per_node on cuda, none requested on cpu.
    gpus_per_node: Optional[int] = None
    # CPUs for the one task per node (which runs torchrun and its workers).
    cpus_per_task: Optional[int] = None
    # e.g. "0" (all memory of the node) or "200G".
    mem: Optional[str] = None
    exclusive: bool = False
    # Extra #SBATCH lines, with or without the "#SBATCH" prefix
    # (e.g. "--constraint=h100").
    extra_sbatch: list[str] = field(default_factory=list)
    # Extra srun arguments (e.g. ["--cpu-bind=none"]).
    srun_args: list[str] = field(default_factory=list)
    # Shell lines run before srun (module load, source a virtualenv, ...).
    setup: list[str] = field(default_factory=list)


@dataclass
class LaunchConfig:
    """How processes are started: torchrun locally, per node, or via SLURM."""

    device: Literal["cpu", "cuda"] = "cuda"
    # local: torchrun on this machine (or one torchrun per node, by hand);
    # slurm: sbatch + srun. The --local / --slurm flags override it.
    scheduler: Literal["local", "slurm"] = "local"
    nnodes: int = 1
    nproc_per_node: int = 1
    # Single-node and static multi-node rendezvous.
    master_addr: str = "127.0.0.1"
    # Null: a free port (local runs), or one derived from the job id under
    # SLURM so that jobs sharing a node do not collide.
    master_port: Optional[int] = None
    # Multi-node: "static" uses master_addr/master_port with a node rank per
    # node; "c10d" uses a rendezvous endpoint (host:port) and assigns ranks.
    rdzv_backend: Literal["static", "c10d"] = "c10d"
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    # Null: runs/<config file name without .yaml>.
    run_dir: Optional[str] = None
    # Python interpreter for torchrun. Null: the one running the launcher.
    python: Optional[str] = None
    # Extra environment for every process.
    env: dict[str, str] = field(default_factory=dict)
    # torchrun --max-restarts: when a worker fails (it crashes, is killed,
    # or a collective times out), torchrun stops the others and starts them
    # all again, this many times at most; the trainer resumes from the
    # latest checkpoint in `save` (so `save` is required, and save_interval
    # bounds the work done again).  Needs the c10d rendezvous, which
    # single-node runs then use too.
    max_restarts: int = 0
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class RunConfig:
    """Everything one training run needs. Flat keys follow Megatron-LM."""

    # --- model ---
    num_layers: int = 12
    hidden_size: int = 768
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: int = 12
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    seq_length: int = 4096
    max_position_embeddings: Optional[int] = None
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    position_embedding_type: Optional[Literal["none", "rope"]] = None
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    # --- parallelism ---
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # How long a collective may wait before its process group gives up
    # (Megatron-LM's --distributed-timeout-minutes): a rank that hangs (a
    # lost node, a stuck GPU) then fails the job instead of stalling it, and
    # torchrun can restart it (launch.max_restarts).  Long enough for the
    # first steps' kernel compilation, which ranks do at different speeds.
    distributed_timeout_minutes: int = 30

    # --- optimisation ---
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_decay_style: Literal["constant", "linear", "cosine", "WSD"] = "cosine"
    lr_wsd_decay_iters: Optional[int] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    fp16: bool = False
    seed: int = 1234

    # --- data ---
    mock_data: bool = False
    # Indexed-dataset prefixes (prefix.bin + prefix.idx), optionally weighted
    # as in Megatron: [0.7, path/a, 0.3, path/b].
    data_path: list[Union[str, float]] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer_type: Literal["ByteTokenizer", "HuggingFaceTokenizer"] = "ByteTokenizer"
    tokenizer_model: Optional[str] = None
    # Packed documents: attention restarts at each end-of-document token
    # (document boundaries go to the kernel as cu_seqlens).
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    # Null: the tokenizer's end-of-document id.
    eod_token: Optional[int] = None
    num_workers: int = 2

    # --- checkpoints, logging, evaluation ---
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    tensorboard_dir: Optional[str] = None
    # One JSON object per logged iteration. Null: <run_dir>/metrics.jsonl.
    metrics_file: Optional[str] = None

    fox: FoxConfig = field(default_factory=FoxConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    # Derived quantities -----------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.launch.nnodes * self.launch.nproc_per_node

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: Optional[int] = None) -> int:
        ws = self.world_size if world_size is None else world_size
        return ws // self.model_parallel_size

    def num_microbatches(self, world_size: Optional[int] = None) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size(world_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# YAML: a loader with YAML 1.2 numbers
# ---------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 number rules.

    PyYAML follows YAML 1.1, where ``1e-3`` is a string (no dot) and
    ``04:00:00`` is the base-60 integer 14400. Both are traps in a training
    config (a learning rate, a SLURM time limit), so ints and floats are
    resolved as YAML 1.2 does.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_int(loader, node):
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_scalar(text: str) -> Any:
    """Parse an override value as YAML (``3`` -> int, ``1e-3`` -> float,
    ``null``, ``[a, b]`` ...); an empty value means null."""
    if text.strip() == "":
        return None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        # Not valid YAML on its own (e.g. "a: b: c"): take it verbatim.
        return text


# ---------------------------------------------------------------------------
# dict <-> dataclasses, with type checks
# ---------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``fox.acp``, ``launch.slurm.time`` ...)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, prefix + f.name + "."))
    return keys


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not guess:
        # A known key placed in the wrong block (e.g. "acp" instead of "fox.acp").
        guess = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    if not guess:
        guess = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return ConfigError(key, f"unknown key{hint}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return names + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against type ``tp``; return it converted where the
    conversion loses nothing (int -> float, scalar -> str for env values)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")

    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(key, f"must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single entry may be written without brackets
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        out = {}
        for k, v in value.items():
            if isinstance(v, (dict, list)) or v is None:
                raise ConfigError(f"{key}.{k}", f"expected a string, got {v!r}")
            # Environment values are strings; accept YAML's 1 / true as "1" / "true".
            out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
        return out
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # e.g. 1e6 iterations
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # schema bug


def _build(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if not isinstance(k, str) or k not in names:
            raise _unknown_key(prefix + str(k), all_keys())
        kwargs[k] = _coerce(prefix + k, v, hints[k])
    return cls(**kwargs)


def config_from_dict(data: Optional[dict]) -> RunConfig:
    """Build a RunConfig from a nested dict (unknown keys and wrong types
    raise ConfigError) and fill in the derived values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"a config must be a mapping of keys, got {type(data).__name__}")
    cfg = _build(RunConfig, data)
    _fill_derived(cfg)
    return cfg


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``key=value`` overrides (dotted keys for blocks, YAML values)
    to a nested dict, in place; returns it."""
    known = all_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(item, "an override must look like key=value")
        # launch.env.<NAME> is free-form; everything else must be a schema key.
        free_form = len(parts) == 3 and parts[:2] == ["launch", "env"]
        if not free_form and key not in known:
            raise _unknown_key(key, known)
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is not a block, cannot set {key}")
            node = child
        node[parts[-1]] = parse_scalar(text)
    return data


def load_config(path, overrides=()) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, type-check it and
    fill in derived values. Call ``validate`` for the cross-key rules."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read config {path}: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a config must be a mapping of keys")
    apply_overrides(data, overrides)
    return config_from_dict(data)


def _fill_derived(cfg: RunConfig) -> None:
    if cfg.ffn_hidden_size is None:
        if cfg.swiglu:
            cfg.ffn_hidden_size = int(math.ceil(3.5 * cfg.hidden_size / 64)) * 64
        else:
            cfg.ffn_hidden_size = 4 * cfg.hidden_size
    if cfg.kv_channels is None and cfg.num_attention_heads > 0:
        if cfg.hidden_size % cfg.num_attention_heads == 0:
            cfg.kv_channels = cfg.hidden_size // cfg.num_attention_heads
    if cfg.position_embedding_type is None:
        cfg.position_embedding_type = "none" if cfg.fox.enabled else "rope"
    if cfg.max_position_embeddings is None:
        cfg.max_position_embeddings = cfg.seq_length
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters


def resolve_run_paths(cfg: RunConfig, name: str = "run", cwd=None) -> RunConfig:
    """Make every path absolute, in place, so the run does not depend on the
    working directory of whoever starts it (a SLURM node, torchrun workers).

    - launch.run_dir: null means runs/<name>; relative to ``cwd``.
    - Outputs (save, load, tensorboard_dir, metrics_file) relative to the run
      dir, so moving the run dir (``--set launch.run_dir=...``) moves them;
      metrics_file null means <run_dir>/metrics.jsonl.
    - Inputs (data_path prefixes, tokenizer_model when it is a local path)
      relative to ``cwd``, as in Megatron-LM.
    Idempotent: absolute paths are left alone.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()

    def absolute(p: str, root: Path) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(str(root / p))

    run_dir = cfg.launch.run_dir if cfg.launch.run_dir is not None else os.path.join("runs", name)
    cfg.launch.run_dir = absolute(run_dir, base)
    rd = Path(cfg.launch.run_dir)
    for key in ("save", "load", "tensorboard_dir", "metrics_file"):
        v = getattr(cfg, key)
        if v is not None:
            setattr(cfg, key, absolute(v, rd))
    if cfg.metrics_file is None:
        cfg.metrics_file = str(rd / "metrics.jsonl")
    cfg.data_path = [absolute(p, base) if isinstance(p, str) else p for p in cfg.data_path]
    if cfg.tokenizer_model is not None:
        local = absolute(cfg.tokenizer_model, base)
        if os.path.exists(local):
            cfg.tokenizer_model = local
    for attr in ("output", "error"):
        v = getattr(cfg.launch.slurm, attr)
        if v is not None:
            setattr(cfg.launch.slurm, attr, absolute(v, rd))
    return cfg


_HEADER = (
    "# Resolved fox-megatron run configuration (defaults and overrides applied).\n"
    "# The trainer reads this file; edit the source config instead.\n"
)


def dump_config(cfg: RunConfig, path) -> Path:
    """Write the resolved config as YAML (readable back by ``load_config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


# ---------------------------------------------------------------------------
# Validation: every cross-key rule, in one place
# ---------------------------------------------------------------------------


def _data_prefixes(cfg: RunConfig) -> list[tuple[str, str]]:
    """(key, prefix) for every dataset prefix in data_path; weights must
    alternate with prefixes when present."""
    items = cfg.data_path
    weighted = any(not isinstance(x, str) for x in items)
    out = []
    if weighted:
        if len(items) % 2:
            raise ConfigError("data_path", "weighted form needs pairs: [weight, prefix, weight, prefix, ...]")
        for i in range(0, len(items), 2):
            w, p = items[i], items[i + 1]
            if isinstance(w, str) or not isinstance(p, str):
                raise ConfigError(f"data_path[{i}]", "weighted form needs pairs: [weight, prefix, ...]")
            if w < 0:
                raise ConfigError(f"data_path[{i}]", f"weight must be >= 0, got {w}")
            out.append((f"data_path[{i + 1}]", p))
    else:
        out = [(f"data_path[{i}]", p) for i, p in enumerate(items)]
    return out


def validate(cfg: RunConfig, world_size: Optional[int] = None, check_files: bool = True) -> RunConfig:
    """Check every rule that involves more than one key. Raises ConfigError
    naming the offending key on the first violation; returns cfg.

    world_size: number of processes; default nnodes x nproc_per_node.
    check_files: also require data and tokenizer files to exist.
    """

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(key, msg)

    # Positive sizes.
    for key in (
        "num_layers", "hidden_size", "num_attention_heads", "seq_length",
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
        "micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_iters",
        "make_vocab_size_divisible_by", "distributed_timeout_minutes",
    ):
        v = getattr(cfg, key)
        need(v > 0, key, f"must be > 0, got {v}")
    for key in ("ffn_hidden_size", "num_query_groups", "kv_channels", "vocab_size",
                "max_position_embeddings", "save_interval", "eval_interval", "lr_decay_iters"):
        v = getattr(cfg, key)
        need(v is None or v > 0, key, f"must be > 0 (or null), got {v}")
    for key in ("lr_warmup_iters", "num_workers", "seed"):
        v = getattr(cfg, key)
        need(v >= 0, key, f"must be >= 0, got {v}")
    for key in ("lr", "adam_eps", "init_method_std", "norm_epsilon"):
        v = getattr(cfg, key)
        need(v > 0, key, f"must be > 0, got {v}")
    for key in ("min_lr", "weight_decay", "clip_grad"):
        v = getattr(cfg, key)
        need(v >= 0, key, f"must be >= 0, got {v}")
    for key in ("adam_beta1", "adam_beta2", "attention_dropout", "hidden_dropout"):
        v = getattr(cfg, key)
        need(0 <= v < 1, key, f"must be in [0, 1), got {v}")

    # Model shape.
    heads, tp = cfg.num_attention_heads, cfg.tensor_model_parallel_size
    groups = cfg.num_query_groups or heads
    if cfg.kv_channels is None:
        need(cfg.hidden_size % heads == 0, "num_attention_heads",
             f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {heads} "
             "(set kv_channels to use another head size)")
    need(heads % groups == 0, "num_query_groups",
         f"num_attention_heads {heads} is not divisible by num_query_groups {groups}")
    need(heads % tp == 0, "tensor_model_parallel_size",
         f"num_attention_heads {heads} is not divisible by tensor_model_parallel_size {tp}")
    need(groups % tp == 0, "num_query_groups",
         f"num_query_groups {groups} is not divisible by tensor_model_parallel_size {tp}")
    need(cfg.ffn_hidden_size % tp == 0, "ffn_hidden_size",
         f"ffn_hidden_size {cfg.ffn_hidden_size} is not divisible by tensor_model_parallel_size {tp}")
    pp = cfg.pipeline_model_parallel_size
    need(cfg.num_layers % pp == 0, "pipeline_model_parallel_size",
         f"num_layers {cfg.num_layers} is not divisible by pipeline_model_parallel_size {pp}")

    # Context parallelism: zigzag layout, 2 x CP chunks of whole kernel tiles.
    cp = cfg.context_parallel_size
    if cp > 1:
        unit = 2 * cp * ATTENTION_BLOCK
        need(cfg.seq_length % unit == 0, "seq_length",
             f"{cfg.seq_length} is not divisible by 2 x context_parallel_size x {ATTENTION_BLOCK} = {unit}")
        if cfg.fox.enabled and cfg.fox.cp_mode == "ulysses":
            # the all-to-all splits heads over CP: the key/value heads (the
            # fewer, with GQA) of one tensor-parallel rank must divide evenly
            need((groups // tp) % cp == 0, "fox.cp_mode",
                 f"ulysses needs the {groups // tp} key/value heads (num_query_groups) per tensor-parallel "
                 f"rank to be divisible by context_parallel_size {cp} (use cp_mode: ring)")

    # Parallel layout vs world size.
    la = cfg.launch
    need(la.nnodes >= 1, "launch.nnodes", f"must be >= 1, got {la.nnodes}")
    need(la.nproc_per_node >= 1, "launch.nproc_per_node", f"must be >= 1, got {la.nproc_per_node}")
    need(la.max_restarts >= 0, "launch.max_restarts", f"must be >= 0, got {la.max_restarts}")
    need(la.max_restarts == 0 or cfg.save is not None, "launch.max_restarts",
         "restarted workers resume from the checkpoints in save, which is not set "
         "(set save, and save_interval to bound the work done again)")
    need(la.max_restarts == 0 or la.rdzv_backend == "c10d", "launch.rdzv_backend",
         "restarts need the c10d rendezvous (after a static one the restarted workers "
         "find the failed ones' addresses)")
    ws = cfg.world_size if world_size is None else world_size
    key_ws = "launch.nproc_per_node" if world_size is None else "world_size"
    need(ws > 0, key_ws, f"world size must be > 0, got {ws}")
    mp = cfg.model_parallel_size
    need(ws % mp == 0, key_ws,
         f"world size {ws} is not divisible by tensor x pipeline x context parallel = "
         f"{tp} x {pp} x {cp} = {mp}")
    dp = ws // mp
    mbs = cfg.micro_batch_size
    need(cfg.global_batch_size % (mbs * dp) == 0, "global_batch_size",
         f"{cfg.global_batch_size} is not divisible by micro_batch_size x data-parallel size = "
         f"{mbs} x {dp} = {mbs * dp}")
    need(not cfg.sequence_parallel or tp > 1, "sequence_parallel",
         "needs tensor_model_parallel_size > 1")

    # Precision.
    need(not (cfg.bf16 and cfg.fp16), "fp16", "bf16 and fp16 are both set; choose one")

    # FoX / ACP.
    need(not cfg.fox.acp or cfg.fox.enabled, "fox.acp",
         "ACP prunes forgetting attention; it needs fox.enabled: true")
    need(cfg.fox.acp_log_eps < 0, "fox.acp_log_eps",
         f"must be < 0 (log of the attention mass a query may lose), got {cfg.fox.acp_log_eps}")
    need(cfg.fox.acp_min_seqlen >= 0, "fox.acp_min_seqlen",
         f"must be >= 0 (a length in tokens), got {cfg.fox.acp_min_seqlen}")

    # Learning-rate schedule.
    need(cfg.min_lr <= cfg.lr, "min_lr", f"{cfg.min_lr} is larger than lr {cfg.lr}")
    need(cfg.lr_warmup_iters <= cfg.lr_decay_iters, "lr_warmup_iters",
         f"{cfg.lr_warmup_iters} is larger than lr_decay_iters {cfg.lr_decay_iters}")
    if cfg.lr_decay_style == "WSD":
        need(cfg.lr_wsd_decay_iters is not None, "lr_wsd_decay_iters",
             "lr_decay_style WSD needs the length of its decay phase")
    if cfg.lr_wsd_decay_iters is not None:
        need(0 < cfg.lr_wsd_decay_iters <= cfg.lr_decay_iters - cfg.lr_warmup_iters,
             "lr_wsd_decay_iters",
             f"{cfg.lr_wsd_decay_iters} must be in (0, lr_decay_iters - lr_warmup_iters = "
             f"{cfg.lr_decay_iters - cfg.lr_warmup_iters}]")

    # Data.
    need(bool(re.fullmatch(r"\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}", cfg.split)), "split",
         f"expected up to three comma-separated weights like '969,30,1', got {cfg.split!r}")
    if cfg.tokenizer_type == "HuggingFaceTokenizer":
        need(cfg.tokenizer_model is not None, "tokenizer_model",
             "HuggingFaceTokenizer needs a local tokenizer path")
        if check_files:
            need(os.path.exists(cfg.tokenizer_model), "tokenizer_model",
                 f"{cfg.tokenizer_model} does not exist")
    if not cfg.mock_data:
        need(len(cfg.data_path) > 0, "data_path", "no dataset given (set data_path, or mock_data: true)")
        prefixes = _data_prefixes(cfg)
        if check_files:
            for key, prefix in prefixes:
                for ext in (".bin", ".idx"):
                    need(os.path.isfile(prefix + ext), key, f"{prefix}{ext} does not exist")
    if cfg.eod_token is not None:
        need(cfg.eod_token >= 0, "eod_token", f"must be >= 0, got {cfg.eod_token}")
        if cfg.vocab_size is not None:
            need(cfg.eod_token < cfg.vocab_size, "eod_token",
                 f"{cfg.eod_token} is not below vocab_size {cfg.vocab_size}")

    # Checkpoints.
    need(cfg.save_interval is None or cfg.save is not None, "save",
         "save_interval is set but no checkpoint directory (save) is given")

    # Launch.
    la = cfg.launch
    if la.master_port is not None:
        need(1 <= la.master_port <= 65535, "launch.master_port", f"must be a TCP port, got {la.master_port}")
    if la.rdzv_endpoint is not None:
        need(bool(re.fullmatch(r"[^\s:]+(:\d{1,5})?", la.rdzv_endpoint)), "launch.rdzv_endpoint",
             f"expected host or host:port, got {la.rdzv_endpoint!r}")
    for name in la.env:
        need(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)), f"launch.env.{name}",
             "not a valid environment variable name")
    if la.slurm.gpus_per_node is not None:
        need(la.slurm.gpus_per_node >= 0, "launch.slurm.gpus_per_node", "must be >= 0")
    if la.slurm.cpus_per_task is not None:
        need(la.slurm.cpus_per_task >= 1, "launch.slurm.cpus_per_task", "must be >= 1")
    if la.slurm.time is not None:
        need(bool(re.fullmatch(r"\d+(-\d+)?(:\d+){0,2}|UNLIMITED|INFINITE", la.slurm.time)),
             "launch.slurm.time", f"expected SLURM time like '04:00:00' or '2-00:00:00', got {la.slurm.time!r}")

    # CPU runs: the trainer's CPU path is torch DDP over gloo in fp32. Half
    # precision matmuls on CPU are slow or unsupported, and megatron-core's
    # distributed optimizer, pipeline p2p and sequence-parallel gathers
    # allocate on CUDA.
    if la.device == "cpu":
        need(not cfg.bf16, "bf16", "launch.device is cpu: CPU runs train in fp32; set bf16: false")
        need(not cfg.fp16, "fp16", "launch.device is cpu: CPU runs train in fp32; set fp16: false")
        need(not cfg.use_distributed_optimizer, "use_distributed_optimizer",
             "launch.device is cpu: the distributed optimizer needs CUDA")
        need(pp == 1, "pipeline_model_parallel_size",
             "launch.device is cpu: pipeline parallelism needs CUDA (megatron-core p2p)")
        need(not cfg.sequence_parallel, "sequence_parallel",
             "launch.device is cpu: sequence parallelism needs CUDA")
    return cfg

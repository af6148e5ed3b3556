"""The training loop: build everything, resume, step, log, evaluate, save."""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch.distributed as dist

from . import checkpoint as ckpt
from .data import GlobalBatches, build_datasets, make_loader, tokenizer_for
from .metrics import Clock, MetricsLogger, flops_per_token, memory_gib
from .model_factory import build_model, count_parameters
from .parallel import init_distributed, set_seed
from .preemption import EXIT_PREEMPTED, StopRequest
from .schedule import LRSchedule


def lr_schedule(cfg) -> LRSchedule:
    return LRSchedule(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_iters=cfg.lr_warmup_iters,
        decay_iters=cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters,
        decay_style=cfg.lr_decay_style,
        wsd_decay_iters=cfg.lr_wsd_decay_iters or 0,
    )


def _log(info, msg: str) -> None:
    if info.is_main:
        print(f"[fox-train] {msg}", flush=True)


def _acp_kept_fraction(model, info) -> Optional[float]:
    """Mean kept-tile fraction of the FoX layers' last forward (all ranks
    take part: the average runs over every rank's layers)."""
    try:
        from fox_megatron.model import collect_acp_kept_fraction
    except ImportError:
        return None
    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    value = collect_acp_kept_fraction(model, group=group)
    return None if value is None else float(value)


def _resume_point(cfg):
    """(checkpoint dir or None, meta): `load` first, else `save` when it
    already holds a checkpoint (a restarted job picks up its own work)."""
    for source in (cfg.load, cfg.save):
        found = ckpt.resolve_checkpoint(source)
        if found is not None:
            return found, ckpt.read_meta(found)
    return None, {}


def train(cfg) -> dict:
    info = init_distributed(cfg, cfg.distributed_timeout_minutes)
    set_seed(cfg.seed, info)
    _log(info, f"world {info.world_size} = TP {info.tp} x PP {info.pp} x CP {info.cp} x DP {info.dp} "
               f"on {info.device.type}; {'FoX' + (' + ACP' if cfg.fox.acp else '') if cfg.fox.enabled else 'standard transformer'}")

    tokenizer = tokenizer_for(cfg)
    model, tconfig = build_model(cfg, info, tokenizer)
    if info.is_cuda:
        from .engine_gpu import MegatronEngine as Engine
    else:
        from .engine_cpu import CpuEngine as Engine
    engine = Engine(cfg, info, model, tconfig)
    num_params = count_parameters(model, info)
    _log(info, f"model: {num_params:,} parameters")

    ckpt_dir, meta = _resume_point(cfg)
    iteration = int(meta.get("iteration", 0))
    consumed = int(meta.get("consumed_samples", 0))
    if ckpt_dir is not None:
        if meta.get("format") != engine.format:
            raise SystemExit(
                f"load: {ckpt_dir} was written in format {meta.get('format')!r}; this run "
                f"({info.device.type}) reads {engine.format!r}"
            )
        ckpt.check_layout(ckpt_dir, meta, info.tp, info.pp)
        if meta.get("global_batch_size") not in (None, cfg.global_batch_size):
            _log(info, f"warning: global_batch_size changed from {meta['global_batch_size']} "
                       f"to {cfg.global_batch_size}; the data order continues by sample count")
        engine.load_checkpoint(ckpt_dir)
        _log(info, f"resumed from {ckpt_dir} at iteration {iteration} ({consumed} samples consumed)")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts:
        # torchrun started the workers again after one failed (launch.max_restarts)
        where = f"from iteration {iteration}" if ckpt_dir is not None else "from the start (no checkpoint yet)"
        _log(info, f"torchrun restart {restarts}: training goes on {where}")

    train_ds, valid_ds = build_datasets(cfg, tokenizer, info)
    nmicro = cfg.global_batch_size // (cfg.micro_batch_size * info.dp)
    batches = GlobalBatches(make_loader(train_ds, consumed, cfg, info), nmicro, cfg, tokenizer.eod, info.device)

    # Generators last: building the data or the model must not shift them.
    if ckpt_dir is not None and not ckpt.restore_rng_state(ckpt_dir):
        _log(info, "warning: the checkpoint has no RNG state for this rank (other world size); reseeded")

    schedule = lr_schedule(cfg)
    fpt = flops_per_token(num_params, cfg.seq_length, cfg.hidden_size, cfg.num_layers)
    logger = MetricsLogger(
        info.is_main, cfg.metrics_file, cfg.tensorboard_dir, cfg.train_iters, fpt, info.world_size, info.is_cuda
    )
    clock = Clock(iteration)
    window = {"loss": 0.0, "steps": 0, "tokens": 0}
    last_saved = iteration if ckpt_dir is not None else None
    history = []

    def save(it: int) -> None:
        t = time.time()
        meta_out = {
            "format": engine.format,
            "consumed_samples": consumed,
            "global_batch_size": cfg.global_batch_size,
            "parallel": {"tp": info.tp, "pp": info.pp, "cp": info.cp, "dp": info.dp,
                         "world_size": info.world_size},
            "config": cfg.to_dict(),
        }
        final = ckpt.save_checkpoint(cfg.save, it, engine.write_checkpoint, meta_out)
        dt = time.time() - t
        clock.pause(dt)
        _log(info, f"saved checkpoint {final} ({dt:.1f}s)")

    stop = StopRequest()
    preempted = False
    while iteration < cfg.train_iters:
        micro_batches = batches.next()
        lr = schedule(iteration + 1)
        out = engine.train_step(micro_batches, lr)
        iteration += 1
        consumed += cfg.global_batch_size
        if not math.isfinite(out["loss"]):
            raise SystemExit(f"loss is {out['loss']} at iteration {iteration}; stopping")
        window["loss"] += out["loss"]
        window["steps"] += 1
        window["tokens"] += out["tokens"]
        history.append(out["loss"])

        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            kept = _acp_kept_fraction(engine.model, info) if cfg.fox.enabled else None
            seconds = clock.interval()
            # Rates count every token processed (loss-masked ones too).
            tokens = window["steps"] * cfg.global_batch_size * cfg.seq_length
            record = {
                "iteration": iteration,
                "train_iters": cfg.train_iters,
                "loss": window["loss"] / window["steps"],
                "lr": lr,
                "grad_norm": out["grad_norm"],
                "consumed_samples": consumed,
                "step_time_s": seconds / window["steps"],
                **logger.throughput(tokens, seconds),
                "acp_kept_fraction": kept,
                "mem_gib": memory_gib(info.is_cuda),
                "elapsed_s": time.time() - clock.t0,
                "eta_s": clock.eta(iteration, cfg.train_iters),
            }
            logger.log_train(record)
            window = {"loss": 0.0, "steps": 0, "tokens": 0}

        if cfg.eval_interval and valid_ds is not None and iteration % cfg.eval_interval == 0:
            t = time.time()
            result = evaluate(engine, valid_ds, cfg, info, tokenizer.eod)
            clock.pause(time.time() - t)
            logger.log_eval({"iteration": iteration, "eval_loss": result})

        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
            save(iteration)
            last_saved = iteration

        if iteration < cfg.train_iters and stop.agreed(info.device):
            preempted = True
            break

    stop.restore()
    if cfg.save and last_saved != iteration:
        save(iteration)
    logger.close()
    if preempted:
        _log(info, f"stopped by signal at iteration {iteration} ({consumed} samples); "
                   f"{'checkpoint saved, re-run to resume' if cfg.save else 'no save path: progress is lost'}")
        return {"iteration": iteration, "losses": history, "exit_code": EXIT_PREEMPTED}
    _log(info, f"done: {iteration} iterations, {consumed} samples")
    return {"iteration": iteration, "losses": history}


def evaluate(engine, valid_ds, cfg, info, eod: int) -> float:
    nmicro = cfg.global_batch_size // (cfg.micro_batch_size * info.dp)
    batches = GlobalBatches(make_loader(valid_ds, 0, cfg, info, wrap=True), nmicro, cfg, eod, info.device)
    loss_sum = tokens = 0.0
    for _ in range(cfg.eval_iters):
        out = engine.eval_step(batches.next())
        loss_sum += out["loss"] * out["tokens"]
        tokens += out["tokens"]
    return loss_sum / max(tokens, 1)

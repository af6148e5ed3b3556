"""fox_megatron.train: a small megatron-core trainer.

One typed config tree (fox_megatron.config.RunConfig) drives components with
one job each:

    main.py           command line: --config X.yaml [--set k=v ...]
    parallel.py       torch.distributed + megatron-core model-parallel groups, seeds
    model_factory.py  GPTModel with the FoX spec, or the baseline (baseline.py)
    data.py           GPTDataset / MockGPTDataset, resumable sampler, packed documents
    tokenizer.py      byte-level tokenizer (no download), local HF tokenizers
    prepare.py        JSONL / text -> indexed .bin/.idx
    optimizer steps   engine_gpu.py (megatron-core DDP, optimizer, pipeline
                      schedules, dist_checkpointing) and engine_cpu.py (gloo,
                      torch AdamW, torch checkpoints) behind one interface
    schedule.py       learning rate: warmup + constant / linear / cosine / WSD
    checkpoint.py     atomic checkpoints, `latest`, RNG state
    metrics.py        FLOPs, MFU, memory, console / JSONL / TensorBoard
    loop.py           the loop itself
"""

"""Training data: megatron-core GPT datasets, a resumable sampler, batches.

- Indexed .bin/.idx data (`data_path`, weighted blends as in Megatron-LM)
  through BlendedMegatronDatasetBuilder + GPTDataset; `mock_data: true` uses
  MockGPTDataset.  The builder constructs the dataset (and writes its index
  cache) on rank 0 first, then the other ranks read the cache after a barrier.
- The order of samples is fixed by the seed (GPTDataset's shuffle index).
  The sampler only needs the number of samples consumed so far to continue
  exactly where a checkpoint left off, like Megatron-LM's pretraining sampler:
  each global batch takes the next `global_batch_size` samples, and within it
  micro-batch m of data-parallel rank r holds samples
  [m * mbs * dp + r * mbs, ... + mbs).
- Packed documents (`reset_attention_mask`): document starts (after each EOD
  token, plus every row start) become cu_seqlens over the row-major
  flattening of the (micro-batch, sequence) tokens, handed to the model as
  PackedSeqParams in the sbhd layout that fox_megatron.model's attention
  reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


def tokenizer_for(cfg):
    if cfg.tokenizer_type == "HuggingFaceTokenizer":
        return build_tokenizer(cfg.tokenizer_model)
    return build_tokenizer("byte")


def _blend(cfg):
    items = list(cfg.data_path)
    if any(not isinstance(x, str) for x in items):
        weights = [float(w) for w in items[0::2]]
        prefixes = [str(p) for p in items[1::2]]
        return prefixes, weights
    return [str(p) for p in items], None


def eval_samples(cfg) -> int:
    # Every evaluation reads the same first eval_iters global batches of the
    # validation split, so successive evaluations are comparable.
    if not cfg.eval_interval:
        return 0
    return cfg.eval_iters * cfg.global_batch_size


def build_datasets(cfg, tokenizer, info):
    """(train, valid) datasets; valid is None without eval_interval."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    if cfg.eod_token is not None and cfg.eod_token != tokenizer.eod:
        tokenizer = _EodOverride(tokenizer, cfg.eod_token)
    blend = None if cfg.mock_data else _blend(cfg)
    ds_config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=blend,
        split=None if cfg.mock_data else cfg.split,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        # FoX attention builds its causal, document-local mask itself; a dense
        # [s, s] mask per sample would only cost memory.
        create_attention_mask=False,
        # Megatron keeps the index cache next to the data (<prefix>/cache);
        # mock data has no such place, so its index goes to the run dir.
        path_to_cache=_mock_cache(cfg) if cfg.mock_data else None,
        mid_level_dataset_surplus=0.005,
    )
    sizes = [cfg.train_iters * cfg.global_batch_size, eval_samples(cfg), 0]
    cls = MockGPTDataset if cfg.mock_data else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, ds_config).build()
    for ds in (train, valid):
        _disable_mask_cache(ds)
    if not sizes[1]:
        valid = None
    if train is None or len(train) < sizes[0]:
        raise SystemExit(
            f"data_path: the training split yields {0 if train is None else len(train)} samples, "
            f"{sizes[0]} are needed (train_iters x global_batch_size)"
        )
    return train, valid


def _disable_mask_cache(dataset) -> None:
    """Turn off GPTDataset's loss-mask cache.

    In megatron-core 0.16.1, when no reset/eod flag is set, GPTDataset caches
    the loss mask of the first sample it reads and then zeroes that same
    tensor where the sample's labels are the pad id: the zeros leak into
    every later sample of the process.  Which sample comes first depends on
    where the run (re)starts, so a resumed run would train on different
    masks.  Recomputing the masks is O(seq_length) per sample.
    """
    if dataset is None:
        return
    for child in getattr(dataset, "datasets", ()):  # BlendedDataset
        _disable_mask_cache(child)
    if hasattr(dataset, "masks_and_position_ids_are_cacheable"):
        dataset.masks_and_position_ids_are_cacheable = False


def _mock_cache(cfg) -> Optional[str]:
    import os

    run_dir = getattr(cfg.launch, "run_dir", None)
    return os.path.join(run_dir, "data_cache") if run_dir else None


class _EodOverride:
    """A tokenizer whose end-of-document id is taken from the config."""

    def __init__(self, base, eod: int):
        self._base, self._eod = base, eod
        self.unique_identifiers = dict(base.unique_identifiers, eod=eod)

    def __getattr__(self, name):
        return getattr(self._base, name)

    @property
    def eod(self):
        return self._eod

    @property
    def eos(self):
        return self._eod


class ResumableBatchSampler:
    """Index lists for this data-parallel rank's micro-batches, from a start.

    Yields one list of `micro_batch_size` indices per micro-batch; a global
    batch is `num_microbatches` consecutive yields.  Stateless apart from the
    start, which the trainer takes from the checkpoint (consumed samples).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, wrap: bool = False):
        if consumed_samples > total_samples and not wrap:
            raise ValueError(f"consumed samples {consumed_samples} > dataset size {total_samples}")
        self.total = total_samples
        self.start = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp = dp_size
        self.wrap = wrap

    def __iter__(self) -> Iterator[List[int]]:
        step = self.mbs * self.dp
        base = self.start
        while True:
            if base + step > self.total:
                if not self.wrap:
                    return
                base = 0
            first = base + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            base += step


def make_loader(dataset, consumed_samples: int, cfg, info, wrap: bool = False):
    sampler = ResumableBatchSampler(
        len(dataset), consumed_samples, cfg.micro_batch_size, info.dp_rank, info.dp, wrap=wrap
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=info.is_cuda,
        # Workers would be re-forked for every evaluation otherwise.
        persistent_workers=cfg.num_workers > 0,
    )


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float32
    position_ids: torch.Tensor  # [b, s] int64
    # Packed documents: FoX takes cu_seqlens (packed_seq_params); the
    # baseline's SDPA takes a document-local causal mask (attention_mask).
    packed_seq_params: Optional[object] = None
    attention_mask: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def document_cu_seqlens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Offsets of document starts over the row-major flattening of [b, s].

    A document starts at every row start and right after every EOD token
    (except past the end of a row).  Returned as int32 [n_docs + 1], first 0,
    last b * s, the format flash-attn and the FoX kernels take.
    """
    b, s = tokens.shape
    flat = tokens.reshape(-1)
    after_eod = torch.nonzero(flat == eod, as_tuple=False).flatten() + 1
    after_eod = after_eod[(after_eod % s) != 0]  # an EOD at a row's end starts nothing
    row_starts = torch.arange(0, b * s + 1, s, device=tokens.device)
    starts = torch.cat([row_starts, after_eod.to(row_starts.dtype)])
    return torch.unique(starts, sorted=True).to(torch.int32)


def packed_params(tokens: torch.Tensor, eod: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = document_cu_seqlens(tokens, eod)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def to_micro_batch(sample: Dict[str, torch.Tensor], cfg, eod: int, device: torch.device) -> MicroBatch:
    """Move a collated sample dict to the device and add packing metadata."""
    nb = device.type == "cuda"
    tokens = sample["tokens"].to(device, non_blocking=nb)
    mb = MicroBatch(
        tokens=tokens,
        labels=sample["labels"].to(device, non_blocking=nb),
        loss_mask=sample["loss_mask"].to(device, dtype=torch.float32, non_blocking=nb),
        position_ids=sample["position_ids"].to(device, non_blocking=nb),
    )
    if cfg.reset_attention_mask:
        if cfg.fox.enabled:
            mb.packed_seq_params = packed_params(tokens, eod)
        else:
            from .baseline import document_causal_mask

            mb.attention_mask = document_causal_mask(tokens, eod)
    if cfg.context_parallel_size > 1:
        mb = _slice_for_context_parallel(mb)
    return mb


def _slice_for_context_parallel(mb: MicroBatch) -> MicroBatch:
    """This CP rank's part of the sequence, in Megatron's zigzag layout.

    Packed documents keep their cu_seqlens over the global (unsplit) rows,
    in both FoX CP modes: the Ulysses mode attends over whole sequences after
    its all-to-all, the ring places every chunk in its documents from them,
    and the token-shift halo slices the document starts the same way."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if mb.attention_mask is not None:
        raise SystemExit(
            "reset_attention_mask: packed documents with context_parallel_size > 1 need FoX "
            "(the baseline transformer's document mask is not split over CP ranks); use "
            "context_parallel_size 1 or unpacked data for the baseline"
        )
    parts = get_batch_on_this_cp_rank(
        {
            "tokens": mb.tokens,
            "labels": mb.labels,
            "loss_mask": mb.loss_mask,
            "position_ids": mb.position_ids,
        }
    )
    out = MicroBatch(parts["tokens"], parts["labels"], parts["loss_mask"], parts["position_ids"])
    out.packed_seq_params = mb.packed_seq_params
    return out


class GlobalBatches:
    """Groups a rank's micro-batch stream into global batches (lists)."""

    def __init__(self, loader, num_microbatches: int, cfg, eod: int, device: torch.device):
        self._it = iter(loader)
        self.n = num_microbatches
        self.cfg, self.eod, self.device = cfg, eod, device

    def next(self) -> List[MicroBatch]:
        out = []
        for _ in range(self.n):
            try:
                sample = next(self._it)
            except StopIteration:
                raise SystemExit("the training data ran out before train_iters was reached") from None
            out.append(to_micro_batch(sample, self.cfg, self.eod, self.device))
        return out

"""prepare -> indexed files -> GPTDataset; packing metadata; resumable sampler."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fox_megatron.config import config_from_dict
from fox_megatron.train.data import (
    GlobalBatches,
    ResumableBatchSampler,
    build_datasets,
    document_cu_seqlens,
    make_loader,
)
from fox_megatron.train.parallel import ParallelInfo
from fox_megatron.train.tokenizer import ByteTokenizer

DOCS = ["hello world, the first document.", "zweites Dokument: ünïcödé ✓", "third\nwith a newline", "x"]


def _info(dp_rank=0, dp=1):
    return ParallelInfo(torch.device("cpu"), dp_rank, dp, 0, 1, 1, 1, dp, 0, 0, 0, dp_rank)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    prefix = str(root / "docs")
    proc = subprocess.run(
        [sys.executable, "-m", "fox_megatron.train.prepare", "--input", str(src), "--output-prefix", prefix],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return prefix


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and tok.eod == 256 and tok.pad == 257
    ids = tok.tokenize("aé✓")
    assert max(ids) < 256 and tok.detokenize(ids + [tok.eod]) == "aé✓"


def test_prepare_roundtrip(prepared):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = ByteTokenizer()
    ds = IndexedDataset(prepared)
    assert len(ds) == len(DOCS)
    assert ds.index.dtype == np.uint16
    for i, text in enumerate(DOCS):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids) == text


def test_gpt_dataset_reads_prepared(prepared, tmp_path):
    cfg = config_from_dict(dict(
        seq_length=16, micro_batch_size=2, global_batch_size=4, train_iters=3, data_path=[prepared],
        split="1,0,0", num_workers=0, reset_attention_mask=True, launch={"device": "cpu", "run_dir": str(tmp_path)},
    ))
    tok = ByteTokenizer()
    train, valid = build_datasets(cfg, tok, _info())
    assert valid is None and len(train) >= 12
    # Every token of the corpus (documents + EOD) appears in the samples of one epoch.
    corpus = np.concatenate([np.array(tok.tokenize(t) + [tok.eod]) for t in DOCS])
    sample = train[0]
    assert sample["tokens"].shape == (16,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert int(sample["tokens"].max()) <= tok.eod and set(sample["tokens"].tolist()) <= set(corpus.tolist())
    # Samples are slices of the (shuffled) documents joined by EOD: every
    # piece between EODs is a piece of one document's bytes.
    ids = sample["tokens"].tolist()
    cuts = [i for i, t in enumerate(ids) if t == tok.eod]
    for a, b in zip([-1] + cuts, cuts + [len(ids)]):
        piece = bytes(ids[a + 1:b])
        assert any(piece in d.encode() for d in DOCS), piece

    batches = GlobalBatches(make_loader(train, 0, cfg, _info()), 2, cfg, tok.eod, torch.device("cpu"))
    mbs = batches.next()
    assert len(mbs) == 2
    for mb in mbs:
        cu = mb.packed_seq_params.cu_seqlens_q
        assert mb.packed_seq_params.qkv_format == "sbhd"
        assert cu[0] == 0 and cu[-1] == mb.tokens.numel() and cu.dtype == torch.int32
        assert torch.equal(cu, document_cu_seqlens(mb.tokens, tok.eod))


def test_cu_seqlens():
    eod = 9
    tokens = torch.tensor([[1, 2, 9, 3, 4, 9], [9, 5, 6, 7, 8, 1]])
    # Row 0: docs [0,3) [3,6) (the EOD at the row's end starts nothing);
    # row 1: [6,7) [7,12).
    assert document_cu_seqlens(tokens, eod).tolist() == [0, 3, 6, 7, 12]
    assert document_cu_seqlens(torch.ones(3, 4, dtype=torch.long), eod).tolist() == [0, 4, 8, 12]


def test_baseline_document_mask():
    from fox_megatron.train.baseline import document_causal_mask

    m = document_causal_mask(torch.tensor([[1, 9, 2, 3]]), eod=9)[0, 0]
    allowed = (~m).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_sampler_resumes_where_it_left_off():
    def stream(consumed, rank, steps):
        it = iter(ResumableBatchSampler(1000, consumed, 2, rank, 2))
        return [next(it) for _ in range(steps)]

    full = {r: stream(0, r, 10) for r in (0, 1)}
    assert full[0][:2] == [[0, 1], [4, 5]] and full[1][:2] == [[2, 3], [6, 7]]
    # 3 global batches of 8 samples (2 micro-batches per rank) = 24 consumed.
    for r in (0, 1):
        assert stream(24, r, 4) == full[r][6:10]
    # Disjoint across ranks, no gaps.
    seen = sorted(i for r in (0, 1) for mb in full[r] for i in mb)
    assert seen == list(range(40))

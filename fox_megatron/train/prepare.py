"""Turn JSONL or plain text into Megatron indexed data (<prefix>.bin/.idx).

    python -m fox_megatron.train.prepare --input docs.jsonl --output-prefix data/docs
    python -m fox_megatron.train.prepare --input book.txt --output-prefix data/book \
        [--tokenizer byte|<local HF tokenizer dir>] [--json-key text] [--text-split doc|line|blank]

JSONL: one document per line, the text under --json-key.  Plain text: the
whole file is one document (doc), or one per line (line), or one per block
separated by blank lines (blank).  Every document ends with the tokenizer's
EOD token, which is where packed training (`reset_attention_mask`) finds the
document boundaries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator

import numpy as np


def iter_documents(path: str, json_key: str = "text", text_split: str = "doc") -> Iterator[str]:
    is_jsonl = path.endswith((".jsonl", ".json", ".jsonl.txt"))
    with open(path, "r", encoding="utf-8") as handle:
        if is_jsonl:
            for lineno, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                if json_key not in record:
                    raise SystemExit(f"{path}:{lineno}: no key {json_key!r} in the record")
                yield str(record[json_key])
        elif text_split == "line":
            for line in handle:
                line = line.rstrip("\n")
                if line:
                    yield line
        elif text_split == "blank":
            block = []
            for line in handle:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)
        else:
            text = handle.read()
            if text:
                yield text


def write_indexed(documents: Iterable[str], output_prefix: str, tokenizer) -> dict:
    """Tokenize `documents` and write <output_prefix>.bin/.idx; returns counts."""
    import torch
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    # Write under temporary names and rename at the end: a reader (or an index
    # cache keyed on these paths) never sees a half-written dataset.
    tmp_prefix = output_prefix + ".tmp"
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    n_docs = n_tokens = 0
    for text in documents:
        ids = tokenizer.tokenize(text)
        ids.append(tokenizer.eod)
        builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
        builder.end_document()
        n_docs += 1
        n_tokens += len(ids)
    if n_docs == 0:
        builder.data_file.close()
        os.remove(get_bin_path(tmp_prefix))
        raise SystemExit("no documents in the input")
    builder.finalize(get_idx_path(tmp_prefix))
    os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
    os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    return {"documents": n_docs, "tokens": n_tokens, "dtype": np.dtype(dtype).name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fox_megatron.train.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, nargs="+", help="JSONL or text files")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (default) or a local Hugging Face tokenizer directory")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--text-split", choices=("doc", "line", "blank"), default="doc",
                        help="how plain-text files are cut into documents")
    args = parser.parse_args(argv)

    from .tokenizer import build_tokenizer

    for path in args.input:
        if not os.path.isfile(path):
            raise SystemExit(f"--input: no such file: {path}")
    tokenizer = build_tokenizer(args.tokenizer)

    def all_documents():
        for path in args.input:
            yield from iter_documents(path, args.json_key, args.text_split)

    counts = write_indexed(all_documents(), args.output_prefix, tokenizer)
    print(
        f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
        f"{counts['tokens']} tokens ({counts['dtype']}), vocab {tokenizer.vocab_size}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

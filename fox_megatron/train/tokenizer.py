"""Tokenizers the data pipeline understands, with no download.

Megatron-Core's GPTDataset reads from its tokenizer only a few attributes:
`vocab_size`, `eod`, `pad` (masked out of the loss when it is unique),
`special_tokens_dict` / `eos` (to check that pad collides with nothing) and
`unique_identifiers` (hashed into the name of the index cache, so that a
different tokenizer never reuses another one's sample index).  Both classes
here provide exactly that plus tokenize/detokenize for `prepare`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then special tokens.

    Ids: 256 <eod>, 257 <pad>, 258 <bos>, 259 <unk>.  The reported vocab size
    can be padded (Megatron pads the embedding table to a multiple of
    `make_vocab_size_divisible_by` x TP); padding ids are never produced.
    """

    NUM_BYTES = 256
    SPECIAL = ("<eod>", "<pad>", "<bos>", "<unk>")

    def __init__(self) -> None:
        self._special = {name: self.NUM_BYTES + i for i, name in enumerate(self.SPECIAL)}
        self.unique_identifiers = OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("version", 1)]
        )

    # --- what GPTDataset reads -------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self.SPECIAL)

    @property
    def eod(self) -> int:
        return self._special["<eod>"]

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        return self._special["<pad>"]

    @property
    def bos(self) -> int:
        return self._special["<bos>"]

    @property
    def special_tokens_dict(self) -> dict:
        return {"eod_token": self.eod, "pad_token": self.pad, "bos_token": self.bos}

    # --- text <-> ids -------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.NUM_BYTES)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never fetched)."""

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise SystemExit(
                f"tokenizer {path!r}: loading a Hugging Face tokenizer needs the "
                "'transformers' package (pip install transformers); the byte tokenizer needs nothing"
            ) from err
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        eod = self._tok.eos_token_id
        if eod is None:
            raise SystemExit(f"tokenizer {path!r} has no eos token to mark document ends")
        self._eod = int(eod)
        pad = self._tok.pad_token_id
        self._pad = int(pad) if pad is not None and int(pad) != self._eod else -1
        self.unique_identifiers = OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("path", path)]
        )

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def special_tokens_dict(self) -> dict:
        return {"eod_token": self._eod}

    def tokenize(self, text: str) -> List[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(np.asarray(ids).tolist()))


def build_tokenizer(name: str = "byte"):
    """`byte` (default) or the path of a local Hugging Face tokenizer directory."""
    if name in (None, "", "byte"):
        return ByteTokenizer()
    return HFTokenizer(name)

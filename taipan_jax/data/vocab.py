"""Vocabularies. ``ByteVocabulary`` uses seqio's layout: 0 = pad, 1 = EOS, 2 = UNK, byte b -> b + 3."""

from __future__ import annotations

import numpy as np


class ByteVocabulary:
    """UTF-8 bytes with seqio's three special ids in front (vocab size 259).

    Decoding drops special ids; byte sequences that are not valid UTF-8 are decoded with
    ``errors="replace"`` (U+FFFD), the documented policy of this project.
    """

    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3
    vocab_size = 256 + 3

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}")
        data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def bytes_per_token(self, ids) -> np.ndarray:
        """Bytes each token stands for (1 for a byte, 0 for a special id)."""
        return (np.asarray(ids) >= self.offset).astype(np.int32)


def get_vocabulary(name: str):
    if name == "bytes":
        return ByteVocabulary()
    raise ValueError(f"unknown vocabulary {name!r}; available: 'bytes'")

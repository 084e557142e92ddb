"""Data: offline corpora, vocabularies and deterministic batch streams."""

from taipan_jax.data.corpora import kjv_text, load_corpus, shakespeare_text
from taipan_jax.data.pipeline import HeldoutWindows, RandomWindowStream
from taipan_jax.data.vocab import ByteVocabulary

__all__ = [
    "ByteVocabulary",
    "HeldoutWindows",
    "RandomWindowStream",
    "kjv_text",
    "load_corpus",
    "shakespeare_text",
]

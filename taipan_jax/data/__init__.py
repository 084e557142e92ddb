"""Data: offline corpora and local files, vocabularies, packing, MQAR and deterministic streams.

Nothing here imports TensorFlow or seqio; ``taipan_jax.data.seqio_tasks`` does (seqio pipeline only).
"""

from taipan_jax.data.corpora import kjv_documents, kjv_text, load_corpus, load_documents, shakespeare_documents, shakespeare_text
from taipan_jax.data.packing import PackedHeldout, PackedStream, StreamPacker, TokenizedDocs, pack_documents
from taipan_jax.data.pipeline import HeldoutWindows, RandomWindowStream
from taipan_jax.data.vocab import ByteVocabulary, get_vocabulary

__all__ = [
    "ByteVocabulary",
    "HeldoutWindows",
    "PackedHeldout",
    "PackedStream",
    "RandomWindowStream",
    "StreamPacker",
    "TokenizedDocs",
    "get_vocabulary",
    "kjv_documents",
    "kjv_text",
    "load_corpus",
    "load_documents",
    "pack_documents",
    "shakespeare_documents",
    "shakespeare_text",
]

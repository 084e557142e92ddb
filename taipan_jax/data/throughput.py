"""Input-pipeline throughput on this machine: ``python -m taipan_jax.data.throughput [--seconds=3]``.

Measures, single process, tokens per second delivered as training batches (``batch(step)``,
seq_len 4096, 8 rows per step) for each pipeline, and the tokenizers' encode speed on the
Shakespeare corpus (a BPE / SentencePiece model is trained on it first, offline). Prints one JSON
line per measurement. Numbers are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags


def _rate(fn, seconds: float, tokens_per_call: int) -> float:
    fn(0)  # warm-up (tokenisation / iterator set-up outside the timing)
    n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(n)
        n += 1
    return (n - 1) * tokens_per_call / (time.perf_counter() - t0)


def main() -> None:
    seconds = flags.DEFINE_float("seconds", 3.0, "Seconds per measurement.")
    seq_len = flags.DEFINE_integer("seq_len", 4096, "Row length.")
    batch = flags.DEFINE_integer("batch", 8, "Rows per step (one process).")
    skip_seqio = flags.DEFINE_bool("skip_seqio", False, "Skip the TensorFlow / seqio measurements.")

    def _main(argv):
        del argv
        from configs import tiny
        from taipan_jax.data import ByteVocabulary, corpora
        from taipan_jax.data.streams import build_streams
        from taipan_jax.data.vocab import get_vocabulary

        L, B, S = seq_len.value, batch.value, seconds.value
        out = []

        def report(**kw):
            out.append(kw)
            print(json.dumps(kw), flush=True)

        c = tiny.get_config()
        c.data.seq_len, c.train.global_batch_size = L, B
        c.data.mixtures.mix = "shakespeare:3,kjv:1"
        bytes_v = ByteVocabulary()
        runs = [("windows", "shakespeare"), ("packed", "shakespeare"), ("packed", "mix")]
        if not skip_seqio.value:
            runs += [("seqio", "shakespeare"), ("seqio", "mix")]
        for pipeline, corpus in runs:
            c.data.pipeline, c.data.train_corpus = pipeline, corpus
            t0 = time.perf_counter()
            stream, _ = build_streams(c.data, c.train, bytes_v, model_vocab_size=259)
            setup = time.perf_counter() - t0
            report(what="train batches", pipeline=pipeline, corpus=corpus, vocab="bytes", seq_len=L, batch=B,
                   setup_s=round(setup, 2), tokens_per_s=round(_rate(stream.batch, S, L * B)))

        text = corpora.shakespeare_text()
        nbytes = len(text.encode())
        tmp = tempfile.mkdtemp()
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from taipan_jax.data.train_spm import train_spm

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpora.shakespeare_documents(), trainers.BpeTrainer(
            vocab_size=32_000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(os.path.join(tmp, "tokenizer.json"))
        spm_path = train_spm("shakespeare", os.path.join(tmp, "spm"), 8000)
        chunks = text.split("\n\n")
        for spec in ("bytes", f"hf:{tmp}/tokenizer.json", f"spm:{spm_path}"):
            v = get_vocabulary(spec)
            t0 = time.perf_counter()
            if hasattr(v, "encode_batch"):
                ids = v.encode_batch(chunks)
                n = sum(x.size for x in ids)
            else:
                n = sum(v.encode(x).size for x in chunks)
            dt = time.perf_counter() - t0
            report(what="tokenize shakespeare", vocab=spec.split(":")[0], tokens=n, mb_per_s=round(nbytes / dt / 1e6, 2),
                   tokens_per_s=round(n / dt))
        c.data.pipeline, c.data.train_corpus = "packed", "shakespeare"
        hf = get_vocabulary(f"hf:{tmp}/tokenizer.json")
        stream, _ = build_streams(c.data, c.train, hf, model_vocab_size=hf.vocab_size)
        report(what="train batches", pipeline="packed", corpus="shakespeare", vocab="hf bpe 32k", seq_len=L, batch=B,
               tokens_per_s=round(_rate(stream.batch, S, L * B)))
        if not skip_seqio.value:
            c.data.pipeline = "seqio"
            stream, _ = build_streams(c.data, c.train, hf, model_vocab_size=hf.vocab_size)
            report(what="train batches", pipeline="seqio", corpus="shakespeare", vocab="hf bpe 32k (numpy_function)",
                   seq_len=L, batch=B, tokens_per_s=round(_rate(stream.batch, S, L * B)))

    app.run(_main)


if __name__ == "__main__":
    main()

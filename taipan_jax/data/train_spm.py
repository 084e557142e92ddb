"""Train a SentencePiece model on a corpus (offline): ``python -m taipan_jax.data.train_spm
--corpus=shakespeare --vocab_size=4096 --output=/tmp/shakespeare_spm`` writes
``/tmp/shakespeare_spm.model`` (use it as ``--config.data.vocab=spm:/tmp/shakespeare_spm.model``).

The special ids follow seqio / T5: 0 pad, 1 EOS, 2 UNK, no BOS (the packer's decoder start is pad).
``byte_fallback`` is on and normalisation is off (identity rule, whitespace kept, no dummy prefix),
so decode(encode(text)) == text for any text and bytes per token are exact. ``--corpus`` takes the corpus specs of
``config.data`` (``shakespeare``, ``kjv``, ``files:<glob>[;field=<name>]``).
"""

from __future__ import annotations

import os

from absl import app, flags


def train_spm(corpus: str, output_prefix: str, vocab_size: int, *, model_type: str = "unigram",
              character_coverage: float = 0.9995, max_sentences: int = 1_000_000,
              decode_errors: str = "replace") -> str:
    """Train on ``corpus`` (one sentence per line of each document); returns the ``.model`` path."""
    import sentencepiece as spm

    from taipan_jax.data.corpora import load_documents

    docs = load_documents(corpus, decode_errors)

    def sentences():
        n = 0
        for d in docs:
            for line in d.splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_sentences:
                        return

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=output_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        hard_vocab_limit=False, minloglevel=2, num_threads=os.cpu_count() or 1,
        # Lossless: no normalisation, whitespace kept as is, no dummy-prefix space.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True,
    )
    return output_prefix + ".model"


def main() -> None:
    corpus = flags.DEFINE_string("corpus", "shakespeare", "Corpus spec (shakespeare | kjv | files:<glob>[;field=f]).")
    output = flags.DEFINE_string("output", None, "Output prefix: writes <prefix>.model and <prefix>.vocab.")
    vocab_size = flags.DEFINE_integer("vocab_size", 4096, "Number of pieces (256 byte pieces + 3 specials included).")
    model_type = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece algorithm.")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not output.value:
            raise app.UsageError("--output is required")
        path = train_spm(corpus.value, output.value, vocab_size.value, model_type=model_type.value)
        print(f"wrote {path}; use --config.data.vocab=spm:{path}")

    app.run(_main)


if __name__ == "__main__":
    main()

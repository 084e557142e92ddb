"""Offline corpora, the byte vocabulary and the deterministic streams."""

import numpy as np
import pytest

from taipan_jax.data import ByteVocabulary, HeldoutWindows, RandomWindowStream, kjv_text, load_corpus, shakespeare_text


def test_offline_corpora_are_real_text():
    s, k = shakespeare_text(), kjv_text()
    assert len(s) > 4_000_000 and "ROMEO" in s and "**" not in s
    assert len(k) > 4_000_000 and k.startswith("Genesis 1:1\tIn the beginning God created")
    # Held-out text is not training text.
    assert "In the beginning God created the heaven" not in s


def test_byte_vocabulary_round_trip_and_policy():
    v = ByteVocabulary()
    text = "Héllo, wörld — ✓\n"
    ids = v.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 259
    assert v.decode(ids) == text
    assert v.decode(np.array([v.eos_id, *ids, v.pad_id])) == text  # specials are dropped
    assert v.decode(np.array([0xFF + 3])) == "\ufffd"  # invalid UTF-8 -> replacement char
    with pytest.raises(ValueError, match="out of range"):
        v.decode(np.array([259]))
    assert v.bytes_per_token(np.array([0, 1, 2, 3, 258])).tolist() == [0, 0, 0, 1, 1]


def test_stream_is_a_pure_function_of_seed_and_step():
    toks = np.arange(10_000, dtype=np.int32)
    a = RandomWindowStream(toks, seq_len=16, global_batch_size=8, seed=3)
    b = RandomWindowStream(toks, seq_len=16, global_batch_size=8, seed=3)
    np.testing.assert_array_equal(a.batch(7)["inputs"], b.batch(7)["inputs"])
    assert not np.array_equal(a.batch(7)["inputs"], a.batch(8)["inputs"])
    batch = a.batch(5)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # shifted by one
    # Each process gets its own rows of the same global batch.
    parts = [RandomWindowStream(toks, seq_len=16, global_batch_size=8, seed=3, process_index=i, process_count=2).batch(5)
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), batch["inputs"])


def test_stream_and_heldout_errors():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        RandomWindowStream(np.arange(10), seq_len=16, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="not divisible by the process count"):
        RandomWindowStream(np.arange(100), seq_len=4, global_batch_size=3, seed=0, process_count=2)
    with pytest.raises(ValueError, match="held-out corpus has 10 tokens"):
        HeldoutWindows(np.arange(10), seq_len=4, batch_size=2, num_batches=2)


def test_heldout_windows_are_contiguous():
    toks = np.arange(100, dtype=np.int32)
    batches = [b for b, _ in HeldoutWindows(toks, seq_len=5, batch_size=2, num_batches=3)]
    assert len(batches) == 3
    flat = np.concatenate([b["inputs"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(flat, np.arange(30))
    np.testing.assert_array_equal(batches[0]["targets"][0], np.arange(1, 6))


def test_load_corpus_files_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert load_corpus(f"files:{tmp_path}/*.txt") == "alpha\n\nbeta"
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(f"files:{tmp_path}/*.md")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(f"files:{tmp_path}/empty.txt")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("c4")

"""A tiny Transformer++ on synthetic MQAR (2 key-value pairs, 2 queries, 16 ids, 16 tokens), CPU.

``python -m taipan_jax.train --config=configs/tiny_mqar.py --workdir=/tmp/mqar`` reaches > 90%
held-out accuracy (``heldout_accuracy``) after ~2,300 steps (tests/test_mqar.py runs the same
setting). Harder settings: ``--config.data.train_corpus='mqar;vocab_size=8192;num_pairs=64;num_queries=64'
--config.data.seq_len=512 --config.model.vocab_size=8192`` (Zoology's).
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    m = c.model
    m.vocab_size, m.block_pattern, m.num_groups, m.d_model, m.dtype = 16, "attention", 2, 64, "float32"
    m.attention.num_heads = m.attention.num_kv_heads = 4
    m.attention.head_dim = 16
    c.data.train_corpus = "mqar;vocab_size=16;num_pairs=2;num_queries=2;random_non_queries=false"
    c.data.heldout_corpus = c.data.train_corpus
    c.data.seq_len = 16
    t = c.train
    t.global_batch_size, t.lr, t.min_lr, t.warmup_steps, t.steps, t.weight_decay = 32, 1e-3, 1e-3, 20, 3000, 0.0
    t.log_every, t.eval_every, t.eval_batches, t.eval_batch_size = 100, 500, 1, 512
    c.checkpoint.every_steps = 1000
    c.sample.num_tokens = 0
    return c

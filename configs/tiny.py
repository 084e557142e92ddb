"""A tiny Taipan that trains in minutes on a CPU, on the offline Shakespeare corpus (bytes).

Two groups of (2 Mamba-2 blocks + 1 SAL); the SAL window (128) is shorter than the context (256)
so the sliding window is exercised.
"""

from taipan_jax.config import base_config


def get_config():
    c = base_config()
    c.model.d_model = 128
    c.model.num_groups = 2
    c.model.block_pattern = "mamba2*2,sal"
    c.model.dtype = "float32"
    c.model.mamba.d_state = 32
    c.model.mamba.headdim = 32
    c.model.mamba.chunk_size = 64
    c.model.sal.num_heads = 4
    c.model.sal.num_kv_heads = 4
    c.model.sal.head_dim = 32
    c.model.sal.window = 128
    c.data.seq_len = 256
    c.train.steps = 300
    c.train.global_batch_size = 16
    c.train.lr = 3e-3
    c.train.min_lr = 3e-4
    c.train.warmup_steps = 30
    c.train.weight_decay = 0.01
    c.train.log_every = 25
    c.train.eval_every = 150
    c.train.eval_batches = 4
    c.train.eval_batch_size = 8
    c.checkpoint.every_steps = 100
    c.sample.num_tokens = 200
    return c

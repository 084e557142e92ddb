"""A tiny model that trains in minutes on a CPU, on the offline Shakespeare corpus (bytes)."""

from taipan_jax.config import base_config


def get_config():
    c = base_config()
    c.model.d_model = 128
    c.model.num_groups = 2
    c.model.block_pattern = "mamba2"
    c.model.dtype = "float32"
    c.model.mamba.d_state = 32
    c.model.mamba.headdim = 32
    c.model.mamba.chunk_size = 64
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

"""A small Taipan config for fast trainer tests (used by the CLI tests and tests/dist_worker.py)."""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model.d_model = 64
    c.model.mamba.d_state = 16
    c.model.mamba.headdim = 16
    c.model.mamba.chunk_size = 16
    c.model.mamba.ngroups = 2
    c.model.sal.num_heads = 4
    c.model.sal.num_kv_heads = 2
    c.model.sal.head_dim = 16
    c.model.sal.window = 24
    c.model.sal.gate_init_frac = 0.4
    c.data.seq_len = 48
    c.train.global_batch_size = 8
    c.train.warmup_steps = 2
    c.train.steps = 12
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.eval_batches = 1
    c.train.eval_batch_size = 8
    c.checkpoint.every_steps = 4
    c.sample.num_tokens = 0
    return c

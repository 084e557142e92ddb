"""The official Mamba-2-130m shape: 24 layers x 768, GPT-NeoX vocabulary 50,277 (padded), tied."""

from taipan_jax.config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 50_277
    c.model.d_model = 768
    c.model.num_groups = 24
    c.model.block_pattern = "mamba2"
    c.model.tie_embeddings = True
    c.data.seq_len = 2048
    c.data.vocab = "bytes"  # the real tokenizer arrives with the data issue; bytes keep it runnable
    return c

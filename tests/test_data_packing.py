"""Packed rows give every document exactly the loss it gets alone (float32): segment ids restart the
SSD state and the conv window, and mask attention, for Taipan and Transformer++."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taipan_jax.data import pack_documents
from taipan_jax.model import build_model
from taipan_jax.model_config import ModelConfig
from taipan_jax.training import token_losses

L = 48
BOS, EOS = 0, 1


def _model_config(family: str) -> ModelConfig:
    from small_config import get_config

    m = get_config().model
    m.dtype = "float32"
    if family == "transformer_pp":
        m.block_pattern, m.num_groups = "attention", 2
        m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 16
    return ModelConfig.from_dict(m.to_dict())


def _docs():
    rs = np.random.RandomState(0)
    # Row 1: three documents and padding; row 2: two documents crossing SSD chunks (16) and the SAL
    # window (24); no document is split across rows.
    row1 = [rs.randint(3, 259, n) for n in (5, 17, 11)]
    row2 = [rs.randint(3, 259, n) for n in (29, 17)]
    return row1, row2


@pytest.mark.parametrize("family", ["taipan", "transformer_pp"])
def test_packed_loss_equals_documents_one_by_one(family):
    cfg = _model_config(family)
    model = build_model(cfg, seed=0)
    row1, row2 = _docs()
    packed = [pack_documents(r, L, bos_id=BOS, eos_id=EOS, num_rows=1) for r in (row1, row2)]
    batch = {k: np.concatenate([p[k] for p in packed]) for k in packed[0]}
    assert batch["weights"][0].sum() == sum(d.size + 1 for d in row1) < L  # row 1 has padding
    assert batch["weights"][1].sum() == L  # row 2 is full

    fwd = jax.jit(lambda x, s: model(x, segment_ids=s))  # eval mode: deterministic SAL selection
    logits, _ = fwd(batch["inputs"], batch["segment_ids"])
    losses = np.asarray(token_losses(logits, batch["targets"]), np.float64) * batch["weights"]
    # Control: the same rows with one segment per row let documents see each other.
    leak, _ = fwd(batch["inputs"], np.ones_like(batch["segment_ids"]))
    leak = np.asarray(token_losses(leak, batch["targets"]), np.float64) * batch["weights"]
    later = batch["segment_ids"] > 1
    assert np.max(np.abs(leak - losses)[later]) > 1e-3

    # Each document alone in its own row (no segment ids), padded at the end: the model is causal, so
    # the padding after a document cannot change its losses. One call for all of them.
    docs = row1 + row2
    alone_in = np.zeros((len(docs), L), np.int32)
    alone_tg = np.zeros((len(docs), L), np.int32)
    for i, d in enumerate(docs):
        alone_in[i, : d.size + 1] = np.concatenate([[BOS], d])
        alone_tg[i, : d.size + 1] = np.concatenate([d, [EOS]])
    lg, _ = jax.jit(lambda x: model(x))(alone_in)
    alone = np.asarray(token_losses(lg, alone_tg), np.float64)
    worst, total_p, total_s, k = 0.0, 0.0, 0.0, 0
    for r, row_docs in enumerate((row1, row2)):
        seg = batch["segment_ids"][r]
        for i, doc in enumerate(row_docs, start=1):
            mine, ref = losses[r][seg == i], alone[k, : doc.size + 1]
            assert mine.shape == ref.shape
            worst = max(worst, float(np.max(np.abs(mine - ref) / np.abs(ref))))
            total_p, total_s, k = total_p + mine.sum(), total_s + ref.sum(), k + 1
    print(f"{family}: total rel diff {abs(total_p - total_s) / abs(total_s):.2e}, worst token rel diff {worst:.2e}")
    assert abs(total_p - total_s) / abs(total_s) <= 1e-5, (total_p, total_s)
    assert worst <= 1e-4, worst  # per token too

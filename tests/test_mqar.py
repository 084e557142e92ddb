"""A tiny Transformer++ learns MQAR (2 key-value pairs, 2 queries, 16 ids, 16 tokens) to > 90% accuracy.

Training runs through the trainer's jitted step on the MQAR stream and stops as soon as the
held-out accuracy (512 validation examples, the trainer's ``evaluate_heldout``) passes 0.9. With
these seeds the induction "phase transition" comes after ~2,100 steps (accuracy sits at 0.75 before
it: the model first answers the second query by elimination); measured: > 0.9 after 2,300 steps, 20 s.
"""

import time

import jax

from configs import tiny
from taipan_jax.data import mqar
from taipan_jax.model_config import ModelConfig
from taipan_jax.train import evaluate_heldout
from taipan_jax.training import Trainer, make_mesh

MAX_STEPS = 4000


def test_tiny_transformer_pp_learns_mqar():
    c = tiny.get_config()
    m = c.model
    m.vocab_size, m.block_pattern, m.num_groups, m.d_model, m.dtype = 16, "attention", 2, 64, "float32"
    m.attention.num_heads = m.attention.num_kv_heads = 4
    m.attention.head_dim = 16
    tc = c.train
    tc.global_batch_size, tc.lr, tc.min_lr, tc.warmup_steps, tc.steps, tc.weight_decay = 32, 1e-3, 1e-3, 20, MAX_STEPS, 0.0
    cfg = mqar.MQARConfig(vocab_size=16, num_pairs=2, num_queries=2, seq_len=16, random_non_queries=False)
    trainer = Trainer(ModelConfig.from_dict(m.to_dict()), tc, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}),
                      c.mesh.rules)
    state = trainer.init_state(0)
    stream = mqar.MQARStream(cfg, global_batch_size=tc.global_batch_size, seed=0)
    heldout = mqar.MQARHeldout(cfg, batch_size=512, num_batches=1, seed=0)
    key = jax.random.key(0)
    t0, history = time.time(), []
    for step in range(MAX_STEPS):
        state, _ = trainer.train_step(state, stream.batch(step), jax.random.fold_in(key, step))
        if (step + 1) % 100 == 0:
            acc = evaluate_heldout(trainer, state["params"], heldout, None)["heldout_accuracy"]
            history.append((step + 1, round(acc, 3)))
            if acc > 0.9:
                break
    print(f"MQAR: {history[-1][1]:.3f} accuracy after {history[-1][0]} steps, {time.time() - t0:.1f} s; {history}")
    assert history[-1][1] > 0.9, history

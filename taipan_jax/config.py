"""The full default configuration; every ``configs/*.py`` starts from :func:`base_config`.

All keys exist here, so ``--config.a.b=v`` overrides of a key that does not exist fail with the
key's name (ml_collections' own check), and every config file has the same structure.
"""

from __future__ import annotations

import ml_collections

from taipan_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=259,
            d_model=768,
            num_groups=24,
            block_pattern="mamba2",
            pad_vocab_multiple=128,
            tie_embeddings=True,
            d_intermediate=0,
            norm_eps=1e-5,
            dtype="bfloat16",
            param_dtype="float32",
            scan_layers=True,
            remat="none",
            mamba=dict(
                d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                A_init_range=(1.0, 16.0), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                dt_limit=(0.0, float("inf")), D_has_hdim=False, conv_bias=True, bias=False,
                ssd_impl="auto", ssd_interpret=False, ssd_shard_map="auto",
            ),
            attention=dict(
                num_heads=12, num_kv_heads=12, head_dim=64, positional="rope", rope_theta=10_000.0,
                window=0, d_intermediate=0, impl="", max_decode_len=8192,
            ),
            sal=dict(
                capacity=0.15, budget_weight=1.0, tau=1.0, tau_min=0.5, tau_anneal_rate=0.0,
                gate="linear", gate_hidden=0, num_heads=12, num_kv_heads=12, head_dim=64,
                window=2048, positional="none", rope_theta=10_000.0, kv_source="all",
                attention="dense", capacity_factor=2.0, gate_init_frac=0.0, d_intermediate=0, impl="auto",
            ),
        )
    )

    # Data (taipan_jax/data/; docs/assumptions.md "Data pipeline"). Corpora are specs —
    # shakespeare | kjv | files:<glob>[;field=f] | tfds:<name>[;split=s][;field=f] (seqio pipeline) |
    # mqar[;vocab_size=V][;num_pairs=P][;num_queries=Q] — or names of `tasks` / `mixtures`.
    c.data = ml_collections.ConfigDict(
        dict(
            pipeline="windows",  # windows (random windows, no TF) | packed (documents, no TF) | seqio (TF)
            train_corpus="shakespeare",
            heldout_corpus="kjv",
            vocab="bytes",  # bytes | spm:<model> | hf:<tokenizer.json> | tiktoken:<rank file>[;special=llama3]
            seq_len=1024,
            shuffle=True,
            decode_errors="replace",  # undecodable input bytes: replace (U+FFFD, counted, logged) | strict
            tfds_data_dir="",  # TFDS's default directory when empty
            tasks=ml_collections.ConfigDict(),  # name -> spec, e.g. tasks.c4 = "tfds:c4/en:3.0.1;field=text"
            mixtures=ml_collections.ConfigDict(),  # name -> "task:rate,task:rate"
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=10_000,
            global_batch_size=64,
            seed=0,
            # Paper recipe (Taipan §4): AdamW, peak 5e-4, cosine to 1e-5, 2000 warm-up, wd 0.01, clip 1.
            lr=5e-4,
            min_lr=1e-5,
            warmup_steps=2000,
            weight_decay=0.01,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            log_every=50,
            eval_every=1000,
            eval_batches=8,
            eval_batch_size=8,
            schedule_steps=0,  # horizon of the cosine decay; 0 = steps (set it to extend a run)
            grad_accum_steps=1,
            nan_policy="halt",  # halt | skip: a non-finite step is never applied either way
            peak_tflops=0.0,  # per device, for MFU; 0 = from the device kind (taipan_jax/flops.py)
            tensorboard=True,
        )
    )

    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=1000,
            max_to_keep=3,  # the last N ...
            keep_every=0,  # ... plus every K-th step forever (0 = none)
            async_save=True,
        )
    )

    # Multi-host: jax.distributed.initialize(). "auto" initialises when the environment describes a
    # cluster (TPU pod, SLURM) or coordinator_address is given; "never" / "always" force it.
    c.distributed = ml_collections.ConfigDict(
        dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1)
    )

    c.mesh = ml_collections.ConfigDict(
        dict(
            # A size of -1 takes all remaining devices.
            shape=dict(data=-1, fsdp=1, tensor=1),
            rules=tuple(DEFAULT_RULES),
        )
    )

    c.sample = ml_collections.ConfigDict(
        dict(prompt="ROMEO:\n", num_tokens=200, temperature=0.8, top_k=0, seed=0)
    )
    return c

"""Resume of the data streams with one and with two processes (jax.distributed on localhost + gloo).

Each process builds the trainer's streams (``build_streams`` with ``jax.process_index()`` /
``jax.process_count()``), records steps 0..N-1, then builds fresh streams ("after a restore") and
asks for steps K..N-1: they must equal the uninterrupted ones. For the random-access packed stream
the two processes' rows, assembled into a global array, must also equal the one-process batch.
Run as a script, this file is the worker.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K = 5, 3
PIPELINES = {
    "packed": dict(pipeline="packed", train_corpus="shakespeare"),
    "packed_mixture": dict(pipeline="packed", train_corpus="mix"),
    "seqio": dict(pipeline="seqio", train_corpus="shakespeare"),
}


def _config(name):
    from configs import tiny

    c = tiny.get_config()
    c.data.seq_len, c.train.global_batch_size, c.train.eval_batches, c.train.eval_batch_size = 32, 4, 1, 2
    c.data.mixtures.mix = "shakespeare:2,kjv:1"
    for k, v in PIPELINES[name].items():
        setattr(c.data, k, v)
    return c


def _batches(name, steps):
    import jax

    from taipan_jax.data import ByteVocabulary
    from taipan_jax.data.streams import build_streams

    c = _config(name)
    stream, _ = build_streams(c.data, c.train, ByteVocabulary(), model_vocab_size=259,
                              process_index=jax.process_index(), process_count=jax.process_count())
    return {s: stream.batch(s) for s in steps}


def worker(out_dir, port, pid, nproc):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    result = {}
    for name in PIPELINES:
        straight = _batches(name, range(N))
        restored = _batches(name, range(K, N))  # fresh streams, first asked for step K
        result[name] = all(np.array_equal(straight[s][k], restored[s][k]) for s in range(K, N) for k in straight[s])
        np.savez(os.path.join(out_dir, f"{name}_p{pid}.npz"), **{f"{s}_{k}": v for s in range(N)
                                                                for k, v in straight[s].items()})
    if nproc > 1:  # the trainer's assembly of process-local rows into the global batch
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        local = _batches("packed", [K])[K]["inputs"]
        arr = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), local)
        glob = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
        result["global_shape"] = list(glob.shape)
        np.save(os.path.join(out_dir, f"global_p{pid}.npy"), glob)
    with open(os.path.join(out_dir, f"result_p{pid}.json"), "w") as f:
        json.dump(result, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out_dir, nproc):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out_dir), str(port), str(i), str(nproc)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.load(open(out_dir / f"result_p{i}.json")) for i in range(nproc)]


def test_streams_resume_exactly_with_one_and_two_processes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r1 = _launch(one, 1)
    r2 = _launch(two, 2)
    for r in r1 + r2:
        assert all(r[name] for name in PIPELINES), r
    assert r2[0]["global_shape"] == [4, 32]
    single = np.load(one / "packed_p0.npz")
    parts = [np.load(two / f"packed_p{i}.npz") for i in range(2)]
    # Random-access packing: the global batch does not depend on the process count.
    for key in single.files:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), single[key])
    np.testing.assert_array_equal(np.load(two / "global_p0.npy"), single[f"{K}_inputs"])
    # Shard-based streams: each process packs its own documents (different rows per process).
    for name in ("packed_mixture", "seqio"):
        a, b = (np.load(two / f"{name}_p{i}.npz") for i in range(2))
        assert a["0_inputs"].shape == (2, 32) and not np.array_equal(a["0_inputs"], b["0_inputs"])


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

"""``python -m taipan_jax.describe --config=configs/X.py``: architecture and parameter count.

Uses abstract initialisation (``nnx.eval_shape``): no weights are allocated, so the 1.3B presets
describe in seconds on a laptop. The last line is ``total_params=<int>``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import jax
from absl import app
from flax import nnx
from ml_collections import config_flags

from taipan_jax.model import abstract_model
from taipan_jax.model_config import ModelConfig


def describe(model_cfg: ModelConfig) -> tuple[str, int]:
    model = abstract_model(model_cfg)
    params = nnx.state(model, nnx.Param)
    by_part: dict[str, int] = defaultdict(int)
    lines = []
    total = 0
    for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        n = math.prod(v.shape)
        total += n
        if keys[0] == "groups":
            # groups / blocks / <index in group> / ...
            idx = int(keys[2])
            part = f"block[{idx}] {model_cfg.group[idx]}"
        else:
            part = keys[0]
        by_part[part] += n
        axes = v.get_metadata().get("out_sharding")
        lines.append(f"  {'/'.join(keys):60s} {str(tuple(v.shape)):24s} {str(axes)}")
    c = model_cfg
    head = [
        f"blocks: {len(c.blocks)} = ({', '.join(c.group)}) x {c.num_groups} groups"
        f"{' (scanned)' if c.scan_layers else ''}",
        f"d_model={c.d_model} vocab={c.vocab_size} (padded {c.padded_vocab_size}) "
        f"tie_embeddings={c.tie_embeddings} d_intermediate={c.d_intermediate}",
        f"mamba2: d_state={c.mamba.d_state} expand={c.mamba.expand} headdim={c.mamba.headdim} "
        f"heads={c.mamba.expand * c.d_model // c.mamba.headdim} ngroups={c.mamba.ngroups} "
        f"d_conv={c.mamba.d_conv} chunk={c.mamba.chunk_size}",
        f"dtype={c.dtype} param_dtype={c.param_dtype} remat={c.remat}",
        "parameters by part (summed over groups):",
    ]
    head += [f"  {k:28s} {v:>15,d}" for k, v in by_part.items()]
    head.append("parameter tensors (path, shape, logical axes):")
    text = "\n".join(head + lines + [f"total_params={total}"])
    return text, total


def main() -> None:
    config_flag = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py"),
        "Path to a configs/*.py file.", lock_config=True,
    )

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        text, _ = describe(ModelConfig.from_dict(config_flag.value.model.to_dict()))
        print(text)

    app.run(_main)


if __name__ == "__main__":
    main()

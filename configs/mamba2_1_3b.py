"""mamba2 at 1.3B parameters (see taipan_jax/presets.py for the shapes)."""

from taipan_jax.presets import preset_config


def get_config():
    return preset_config("mamba2", "1_3b")

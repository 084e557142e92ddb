"""taipan at 190M parameters (see taipan_jax/presets.py for the shapes)."""

from taipan_jax.presets import preset_config


def get_config():
    return preset_config("taipan", "190m")

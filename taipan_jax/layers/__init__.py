"""Flax NNX building blocks of taipan_jax."""

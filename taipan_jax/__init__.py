"""taipan_jax: Taipan (Mamba-2 + Selective Attention Layers) in JAX / Flax NNX."""

__version__ = "0.1.0"

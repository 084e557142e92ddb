"""taipan_190m on C4 from TFDS through seqio, with Llama-3's tokenizer (an example to adapt).

Needs the prepared TFDS dataset (``tfds build c4/en`` or a copy in ``TFDS_DATA_DIR``) and a local
copy of Llama-3's ``tokenizer.model`` (a tiktoken rank file); nothing is downloaded by the trainer:

    python -m taipan_jax.train --config=configs/taipan_190m_c4.py --workdir=gs://bucket/run \
        --config.data.vocab='tiktoken:/path/to/llama3/tokenizer.model;special=llama3' \
        --config.data.tfds_data_dir=gs://bucket/tensorflow_datasets
"""

from taipan_jax.presets import preset_config


def get_config():
    c = preset_config("taipan", "190m")
    c.data.pipeline = "seqio"
    c.data.tasks.c4_train = "tfds:c4/en:3.1.0;split=train;field=text"
    c.data.tasks.c4_validation = "tfds:c4/en:3.1.0;split=validation;field=text"
    c.data.train_corpus, c.data.heldout_corpus = "c4_train", "c4_validation"
    c.data.vocab = "tiktoken:/path/to/llama3/tokenizer.model;special=llama3"
    c.sample.num_tokens = 0
    return c

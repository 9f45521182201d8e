"""Training and evaluation data: pair sources, the tf.data pipeline, TFDS builders, synthetic rain.

`sources` and `synthetic` need no TensorFlow; `pipeline` imports it on first
use and `tfds_builders` on import (see the package docstring of drsformer_jax).
"""

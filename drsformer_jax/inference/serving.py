"""Exporting a DRSformer for serving: a StableHLO program and a TensorFlow SavedModel.

- `model.stablehlo`: `jax.export` of the forward pass with symbolic batch, height
  and width, input (N, 8*h, 8*w, 3) float32 in [0, 1] -> restored float32 (not
  clamped), lowered for every platform asked (cpu, cuda, tpu). The weights are
  constants inside the program. `drsformer_jax.exported.load_exported` runs it
  with JAX alone and adds the padding, clamping and cropping of test.py, so any
  image size works.
- `saved_model/`: the same model through jax2tf (native serialization, batch 1
  inside: TensorFlow cannot refine top_k's shapes over a symbolic batch, so the
  signatures run the images of a batch one after the other) in a TensorFlow
  SavedModel whose signatures do the whole test.py procedure for any image size:
  `serving_default` takes uint8 (N, H, W, 3) and returns uint8 (`derained`),
  `derain_float` takes and returns float32 in [0, 1].

Exported for one platform, the model runs that platform's formulation
(`DRSformer.for_platform`: NHWC stencils on TPU), whatever machine exports it; for
several, the portable one (`conv_impl="xla"`, NHWC), which is GPUs' own. One
program holding each platform's formulation (`lax.platform_dependent`) traces more
slowly and is larger, so a TPU server is best given a `--platforms tpu` export.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import export
from jax._src.export import _export  # see _stablehlo_readable_by_tensorflow
from jax._src.lib import _jax
from jaxlib.mlir.dialects import stablehlo

from drsformer_jax import exported
from drsformer_jax.model.drsformer import DRSformer
from drsformer_jax.utils.lazy_tf import import_tf

PLATFORMS = ("cpu", "cuda", "tpu")
SAVED_MODEL_DIR = "saved_model"
LOADER_FILE = "drsformer_exported.py"


def serving_model(model: DRSformer, platforms: Sequence[str]) -> DRSformer:
    """`model` in the formulation of the one platform exported for, else the portable one."""
    return model.for_platform(platforms[0] if len(platforms) == 1 else "cuda")


def forward_fn(model: DRSformer, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """The model's forward pass with the weights closed over (they become constants)."""
    return lambda x: model.apply(variables, x)


def _input_spec() -> jax.ShapeDtypeStruct:
    b, h, w = export.symbolic_shape("b, h, w")
    return jax.ShapeDtypeStruct((b, exported.MULTIPLE * h, exported.MULTIPLE * w, 3),
                                jnp.float32)


def export_stablehlo(model: DRSformer, variables: Any, directory: Path,
                     platforms: Sequence[str] = PLATFORMS) -> Path:
    """Writes `model.stablehlo` (and the standalone loader) into `directory`."""
    model = serving_model(model, platforms)
    program = export.export(jax.jit(forward_fn(model, variables)),
                            platforms=tuple(platforms))(_input_spec())
    path = directory / exported.PROGRAM_FILE
    path.write_bytes(program.serialize())
    shutil.copyfile(exported.__file__, directory / LOADER_FILE)
    return path


@contextlib.contextmanager
def _stablehlo_readable_by_tensorflow() -> Iterator[None]:
    """Serialises StableHLO for TensorFlow's XlaCallModule while the block runs.

    jax.export writes StableHLO of its 4-week compatibility window (1.15 with JAX
    0.10), which TensorFlow 2.21 cannot read (it reads up to 1.13.7, the 12-week
    window). jax.export has no public switch, so its serialiser is replaced by one
    that targets the 12-week window, for the SavedModel only.
    """
    original = _export._module_to_bytecode
    target = stablehlo.get_version_from_compatibility_requirement(
        stablehlo.StablehloCompatibilityRequirement.WEEK_12)

    def to_bytecode(module: Any) -> bytes:
        return _jax.mlir.serialize_portable_artifact(
            module, target, jax.extend.backend.get_backend().serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def export_saved_model(model: DRSformer, variables: Any, directory: Path,
                       platforms: Sequence[str] = PLATFORMS) -> Path:
    """Writes a TensorFlow SavedModel with the `serving_default` and `derain_float`
    signatures (the whole test.py procedure, any image size) into `directory`."""
    tf = import_tf()
    from jax.experimental import jax2tf  # imports TensorFlow: the documented boundary

    model = serving_model(model, platforms)
    with _stablehlo_readable_by_tensorflow():
        model_tf = jax2tf.convert(forward_fn(model, variables), with_gradient=False,
                                  # Batch 1: TensorFlow cannot refine top_k's shapes
                                  # over a symbolic batch; the signatures map over images.
                                  polymorphic_shapes=["(1, 8*h, 8*w, 3)"],
                                  native_serialization_platforms=tuple(platforms))
        module = _serving_module(tf, model_tf)
        path = directory / SAVED_MODEL_DIR
        tf.saved_model.save(module, str(path), signatures={
            "serving_default": module.derain_uint8, "derain_float": module.derain_float})
    return path


def _serving_module(tf: Any, model_tf: Callable) -> Any:
    """tf.Module whose functions pad, run, clamp, crop (and convert uint8) as test.py."""

    def reflect(size: Any, target: Any) -> Any:  # as exported.reflect_indices
        period = tf.maximum(2 * (size - 1), 1)
        i = tf.range(target) % period
        return tf.where(i < size, i, period - i)

    def restore_one(image: Any) -> Any:
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        m = exported.MULTIPLE
        hp, wp = (h + m - 1) // m * m, (w + m - 1) // m * m
        padded = tf.gather(tf.gather(image, reflect(h, hp), axis=0), reflect(w, wp), axis=1)
        return tf.clip_by_value(model_tf(padded[None])[0], 0.0, 1.0)[:h, :w]

    def restore(x: Any) -> Any:
        return tf.map_fn(restore_one, x, fn_output_signature=tf.float32)

    module = tf.Module()
    module.derain_float = tf.function(
        lambda images: {"derained": restore(images)}, autograph=False,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    module.derain_uint8 = tf.function(
        lambda images: {"derained": tf.cast(tf.round(
            restore(tf.cast(images, tf.float32) / 255.0) * 255.0), tf.uint8)},
        autograph=False,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    return module

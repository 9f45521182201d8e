"""The train step as `train_and_evaluate` builds it, lowered for TPU and GPU from this CPU
host (no accelerator, no libtpu: an `AbstractMesh` names the platform): each platform's
program has the formulation `FORMULATIONS` gives it, not the host's."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from drsformer_jax.model.convolution import FORMULATIONS
from drsformer_jax.release import RELEASE_OPTIM
from drsformer_jax.train import trainer

DEVICES = 4


@functools.cache  # a lowering is shared by the tests that read it
def lowered_train_step(platform: str, use_mefc: bool = False, **fields) -> str:
    """MEFC where a test reads its products: it is two thirds of a tiny model's program."""
    config = ml_collections.ConfigDict(dict(
        RELEASE_OPTIM, global_batch_size=DEVICES, dim=8, num_blocks=(1, 1, 1, 1),
        heads=(1, 1, 2, 2), use_mefc=use_mefc, **fields))
    model, tx = trainer.create_model(config), trainer.create_optimizer(config)
    device = AbstractDevice(device_kind=f"abstract {platform}", num_cores=1, platform=platform)
    mesh = AbstractMesh((DEVICES,), ("data",), abstract_device=device)
    step = trainer.make_train_step(config, model, tx, mesh)
    state = jax.eval_shape(lambda: trainer.create_train_state(config, model, tx))
    image = jax.ShapeDtypeStruct((DEVICES, 16, 16, 3), jnp.float32)
    traced = step.fn.trace(state, {"input": image, "target": image})
    return traced.lower(lowering_platforms=(platform,)).as_text()


def formulation(text: str) -> tuple[str, str]:
    """(conv_impl, layout) of a lowered program: grouped convolutions are "xla"'s, and
    the dense 3x3 convolutions' dimension numbers give the layout."""
    grouped = [int(n) for n in re.findall(r"feature_group_count = (\d+)", text) if int(n) > 1]
    layouts = set(re.findall(r"dim_numbers = \[(b, 0, 1, f|b, f, 0, 1)\]", text))
    assert len(layouts) == 1, layouts
    return ("xla" if grouped else "shift",
            "NHWC" if layouts == {"b, 0, 1, f"} else "NCHW")


@pytest.mark.parametrize("platform", ["tpu", "cuda", "cpu"])
def test_train_step_lowered_for_a_platform_has_its_formulation(platform):
    key = platform if platform in FORMULATIONS else "gpu"
    assert formulation(lowered_train_step(platform)) == FORMULATIONS[key][:2]


def test_an_explicit_formulation_wins_over_the_platform():
    text = lowered_train_step("tpu", conv_impl="xla", layout="NCHW")
    assert formulation(text) == ("xla", "NCHW")


def test_matmul_precision_reaches_the_program():
    """"highest" marks every dot and convolution; TKSA's scores are highest anyway."""
    default = lowered_train_step("cuda", use_mefc=True, matmul_precision="default")
    highest = lowered_train_step("cuda", use_mefc=True, matmul_precision="highest")
    ops = len(re.findall(r"stablehlo\.(dot_general|convolution)", highest))
    assert 0 < count(default) < ops
    assert count(highest) == ops


def count(text: str) -> int:
    """Dots and convolutions at HIGHEST precision in a lowered program."""
    return len(re.findall(r"precision = \[HIGHEST, HIGHEST\]|precision_config = "
                          r"\[#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>\]",
                          text))


def test_a_batch_that_does_not_split_over_a_pod_names_the_fix():
    """The release's batch of 16 on a 32-chip slice: one line with the smallest batch that
    splits and the learning rate scaled linearly with it."""
    config = ml_collections.ConfigDict(dict(RELEASE_OPTIM, global_batch_size=16, dim=8,
                                            num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2)))
    model, tx = trainer.create_model(config), trainer.create_optimizer(config)
    device = AbstractDevice(device_kind="abstract tpu", num_cores=1, platform="tpu")
    mesh = AbstractMesh((32,), ("data",), abstract_device=device)
    with pytest.raises(trainer.TrainingError) as error:
        trainer.make_train_step(config, model, tx, mesh)
    message = str(error.value)
    assert "\n" not in message and "over the 32 devices" in message
    assert "--config.global_batch_size=32" in message
    assert "--config.learning_rate=0.0006" in message
    config.global_batch_size = 40  # not a multiple either: the next one up
    with pytest.raises(trainer.TrainingError, match="global_batch_size=64;.*0.00048"):
        trainer.make_train_step(config, model, tx, mesh)

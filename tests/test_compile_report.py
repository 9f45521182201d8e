"""The deviceless compile report's parts that need no accelerator compiler: target names,
the figures it reads off a compiled program, and the affine batch search."""

import jax
import jax.numpy as jnp
import pytest

from drsformer_jax import compile_report as cr


def test_targets_name_chips_as_cloud_tpu_and_gpus_do():
    assert cr.parse_target("tpu:v5e-4") == (cr.TARGETS["tpu:v5e"], 4)
    assert cr.parse_target("tpu:v4-8") == (cr.TARGETS["tpu:v4"], 4)  # cores, 2 a chip
    assert cr.parse_target("cuda:h100") == (cr.TARGETS["cuda:h100"], 1)
    assert cr.parse_target("cuda:h200-4")[1] == 4
    # GPUs get JAX's default preallocation of the device's memory.
    assert cr.TARGETS["cuda:h100"].memory_bytes == int(0.75 * 84942979072)
    for bad in ("tpu:v5e-3", "tpu:v4-5", "cuda:h300", "gpu", "tpu:v5e-x"):
        with pytest.raises(ValueError, match="--target"):
            cr.parse_target(bad)


def test_every_gpu_target_description_is_shipped():
    for target in cr.TARGETS.values():
        if target.platform == "cuda":
            text = (cr.TARGET_DIR / target.topology).read_text()
            assert "device_memory_size" in text and "Apache" in text


def test_a_compiled_program_reports_memory_cost_and_its_largest_buffer():
    def f(x):
        y = jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=1)  # (64, 512)
        return (y @ y.T).sum()

    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    report = cr.compile_program(lambda: jax.jit(f).lower(x), cr.Target("cpu", 10 ** 9))
    mem = report["memory"]
    assert mem["argument"] == 64 * 256 * 4
    assert mem["peak"] == mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
    assert report["flops"] >= 2 * 64 * 64 * 512 and report["fits"]
    shapes = [b["shape"] for b in report["largest_buffers"]]
    assert "f32[64,512]" in shapes or "f32[64,64]" in shapes


def test_max_batch_follows_the_line_and_checks_it():
    per_image, fixed = 3 * 2 ** 30, 2 ** 30
    target = cr.Target("tpu", 16 * 2 ** 30)
    compiled = []

    def make(batch):
        compiled.append(batch)
        peak = fixed + per_image * batch
        return {"memory": {"peak": peak}, "fits": peak <= target.memory_bytes}

    out = cr.max_batch(make, target)
    assert out["predicted"] == 5 and out["max_batch"] == 5
    assert out["bytes_per_image"] == per_image and compiled == [1, 2, 5]

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


def test_stacks_name_every_block_the_model_has():
    from drsformer_jax.model.drsformer import DRSformer, abstract_params

    model = DRSformer(dim=8, num_blocks=(1, 2, 1, 3), heads=(1, 1, 2, 2), use_mefc=False)
    params = abstract_params(model)
    blocks = {name for name in params if "norm1" in params[name]}  # transformer blocks
    expected = set()
    for name, depth, channels, _, _ in model.stacks():
        expected |= {f"{name}_{i}" for i in range(depth)}
        assert params[f"{name}_0"]["norm1"]["scale"].shape == (channels,), name
    assert blocks == expected


def test_the_full_estimate_adds_the_extra_blocks_and_the_larger_state(monkeypatch):
    """Stacks of one kind share a compile; each stack adds depth - 1 blocks' residuals."""
    sizes = {(48, 128): 1, (96, 64): 10, (192, 32): 100, (384, 16): 1000, (96, 128): 10000}
    compiled = []

    def fake_compile(lower, target, chips=1):
        _, _, channels, _, side = lower.args
        compiled.append((channels, side))
        return {"memory": {"output": sizes[channels, side]}, "compile_s": 0.0}

    monkeypatch.setattr(cr, "compile_program", fake_compile)
    # The reduced model's config names its blocks; the full one keeps the release's.
    monkeypatch.setattr(cr, "train_state_bytes",
                        lambda config: 5 if "num_blocks" in config else 7)
    args = cr.parse_args(["--target", "cpu", "--programs", "blocks"])
    out = cr.block_residuals(args, cr.Target("cpu", 0), None, 6)
    assert sorted(compiled) == sorted(sizes)  # one compile per kind of block
    # release: (4, 6, 6, 8) -> 3 + 2 * 5 * 10 + 2 * 5 * 100 + 7 * 1000 + 3 * 10000
    assert out["extra_blocks_residual_bytes"] == 3 + 100 + 1000 + 7000 + 30000
    assert out["extra_state_bytes"] == 7 - 5
    assert out["full_minus_reduced_bytes"] == 38103 + 2

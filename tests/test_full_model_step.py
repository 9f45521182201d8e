"""The full default model's train step compiles and runs within a memory ceiling on CPU.

The full DRSformer (dim 48, blocks (4, 6, 6, 8), heads (1, 2, 4, 8), MEFC), with the
CPU defaults (layout NCHW, conv_impl shift), through `train.make_train_step` on one
device, at a 1 x 32 x 32 crop. Before the fix in `cpu_stencils.shifted_depthwise_sum`
(the kernel gradient's k*k per-tap sums were taken by XLA:CPU's YNNPACK reduce fusion,
which materialises every shifted tap as its own buffer, all alive at once) the
compiled program's buffers grew by gigabytes per block and the 64 x 64 step did not
fit in 23 GB.

Run as a script for the figures: `python tests/test_full_model_step.py [batch] [size]`.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

# Compiled buffers (temp + arguments + outputs) at 1 x 32 x 32: 1.27 GB since the fix, about
# 1 GB more per block before it (docs/performance.md).
CEILING_BYTES = 2.0e9
BATCH, SIZE = 1, 32


def compile_and_run(batch: int = BATCH, size: int = SIZE) -> dict:
    from drsformer_jax import train
    from drsformer_jax.model.drsformer import from_config, init_params
    from drsformer_jax.release import RELEASE_OPTIM

    model = from_config(dict(dim=48, num_blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8),
                             use_mefc=True, layout="auto", conv_impl="auto"))
    config = ml_collections.ConfigDict(dict(RELEASE_OPTIM, global_batch_size=batch))
    tx = train.create_optimizer(config)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    step = train.make_train_step(config, model, tx, mesh)
    params = init_params(model, 0)
    state = jax.device_put(train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=tx.init(params)), step.state_sharding)
    rng = np.random.default_rng(0)
    rainy = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    batch_arrays = {"input": jax.device_put(rainy, step.batch_sharding),
                    "target": jax.device_put(rainy * 0.9, step.batch_sharding)}
    start = time.perf_counter()
    # XLA's buffer assignment, what the ceiling is about, is the same whatever the suite's
    # compiler flags (conftest.py); this large program compiles faster with today's emitters.
    compiled = step.fn.lower(state, batch_arrays).compile({"xla_cpu_use_fusion_emitters": True})
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    start = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    loss = float(jax.block_until_ready(metrics["train_loss"]))
    run_s = time.perf_counter() - start
    return dict(compile_s=compile_s, run_s=run_s, loss=loss,
                params_finite=bool(metrics["params_finite"]),
                temp_bytes=mem.temp_size_in_bytes, argument_bytes=mem.argument_size_in_bytes,
                output_bytes=mem.output_size_in_bytes,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def test_full_model_train_step_fits():
    r = compile_and_run()
    total = r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
    assert total < CEILING_BYTES, r
    assert np.isfinite(r["loss"]) and r["params_finite"], r


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(compile_and_run(*args))

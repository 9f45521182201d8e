"""Memory figures for tools/gpu_benchmark.sh, from compiled programs (compiles, barely runs).

- largest train batch at SIZE x SIZE that fits, with and without remat: the compiled
  train step's buffers (XLA memory_analysis, temp + arguments + outputs) at two batch
  sizes, extrapolated linearly to the device's memory, then checked by compiling and
  running one step at the predicted batch (and stepping down by 1/8 while that fails);
- inference memory per pixel: the compiled forward's buffers at two image sizes,
  (bytes(big) - bytes(small)) / (pixels(big) - pixels(small)).

    python tools/gpu_extras.py --json out.json [--size 128] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drsformer_jax import train  # noqa: E402
from drsformer_jax.benchmark import RELEASE_OPTIM  # noqa: E402
from drsformer_jax.model.drsformer import from_config, init_params  # noqa: E402


def _model(tiny: bool, remat: bool, dtype: str) -> Any:
    arch = (dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2)) if tiny
            else dict(dim=48, num_blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8)))
    return from_config(dict(arch, use_mefc=True, remat=remat, dtype=dtype))


def _total(compiled: Any) -> int:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def device_memory_bytes() -> int | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


class _Step:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.params = init_params(model, 0)

    def compiled(self, batch: int, size: int, run: bool = False) -> tuple[Any, float]:
        config = types.SimpleNamespace(**RELEASE_OPTIM, global_batch_size=batch)
        tx = train.create_optimizer(config)
        mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
        step = train.make_train_step(config, self.model, tx, mesh)
        state = jax.device_put(train.TrainState(step=jnp.zeros((), jnp.int32),
                                                params=self.params,
                                                opt_state=tx.init(self.params)),
                               step.state_sharding)
        x = jax.device_put(np.full((batch, size, size, 3), 0.5, np.float32),
                           step.batch_sharding)
        data = {"input": x, "target": x}
        start = time.perf_counter()
        compiled = step.fn.lower(state, data).compile()
        compile_s = time.perf_counter() - start
        if run:
            jax.block_until_ready(compiled(state, data))
        return compiled, compile_s


def largest_batch(tiny: bool, remat: bool, size: int, limit: int | None) -> dict[str, Any]:
    s = _Step(_model(tiny, remat, "float32"))
    b1, b2 = 2, 4
    m1, m2 = _total(s.compiled(b1, size)[0]), _total(s.compiled(b2, size)[0])
    per_image = max((m2 - m1) / (b2 - b1), 1.0)
    out: dict[str, Any] = {"remat": remat, "bytes_at_batch": {b1: m1, b2: m2},
                           "bytes_per_image": per_image}
    if limit is None:
        return out
    fixed = m1 - per_image * b1
    guess = max(int((0.95 * limit - fixed) // per_image), 1)
    if tiny:
        guess = min(guess, 8)
    out["predicted"] = guess
    while guess >= 1:
        try:
            s.compiled(guess, size, run=True)
            out["largest_fitting"] = guess
            break
        except Exception as e:  # noqa: BLE001 - out of memory surfaces as various errors
            out.setdefault("failed", []).append([guess, type(e).__name__])
            guess = guess - max(guess // 8, 1)
    return out


def inference_bytes_per_pixel(tiny: bool, dtype: str) -> dict[str, Any]:
    model = _model(tiny, False, dtype)
    params = init_params(model, 0)
    sizes = (64, 128) if tiny else (256, 512)
    totals = {}
    for n in sizes:
        x = jnp.zeros((1, n, n, 3), jnp.float32)
        totals[n] = _total(jax.jit(model.apply).lower({"params": params}, x).compile())
    a, b = sizes
    return {"dtype": dtype, "bytes_at_size": totals,
            "bytes_per_pixel": (totals[b] - totals[a]) / (b * b - a * a)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    limit = device_memory_bytes()
    result: dict[str, Any] = {"device": str(jax.devices()[0]), "device_memory_bytes": limit,
                              "size": args.size}
    for remat in (False, True):
        result[f"largest_batch_remat_{remat}"] = largest_batch(args.tiny, remat, args.size,
                                                               limit)
    result["inference_memory"] = [inference_bytes_per_pixel(args.tiny, d)
                                  for d in ("float32", "bfloat16")]
    text = json.dumps(result, indent=2, default=str)
    print(text)
    with open(args.json, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

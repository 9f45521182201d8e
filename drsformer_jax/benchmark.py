"""Times DRSformer's forward pass and full train step; optionally the release's PyTorch model.

    python -m drsformer_jax.benchmark --height 256 --width 256 --batch 1 --steps 3
    python -m drsformer_jax.benchmark --compare-torch --reference-repo PATH/TO/DRSformer \\
        --modes forward --json bench.json

Each program is compiled once, ahead of time (`jit(...).lower(...).compile()`,
reported as `compile_s`, with the compiled program's `memory` from XLA's
memory_analysis and the process's `peak_rss_bytes`); its first call is timed
apart (`first_call_s`), then `--warmup` untimed calls, then `--steps` timed calls
of the same compiled executable on the same input, of which `median_s` is the
median (PyTorch: one warm-up call, then the same). Weights are
random (PyTorch's default initialisation on both sides): the cost is the
converted weights'. The train step is the whole update, L1 loss, gradient,
global-norm clipping and AdamW: the step `train_and_evaluate` runs
(`train.make_train_step`, the batch sharded over every device), with the
release's optimizer settings; the PyTorch train step is the release's
(torch.optim.AdamW, clip_grad_norm_, L1 loss). `--compare-torch` imports the
release's architecture file from `--reference-repo` (nothing of it is copied
here) and runs it on the same inputs, on `--torch-device`, in the same process, and reports
our time over PyTorch's. The result is printed as JSON and written to `--json`.

This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from drsformer_jax import train
from drsformer_jax.model.convolution import (
    CONV_IMPLS,
    LAYOUTS,
    resolve_conv_impl,
    resolve_layout,
)
from drsformer_jax.model.drsformer import DTYPES, DRSformer, count_params, from_config, init_params
from drsformer_jax.release import RELEASE_OPTIM, release_class

MODES = ("forward", "train")


def time_calls(fn: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Runs `fn` `steps` times; wall-clock seconds of each call and their median."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"times_s": times, "median_s": statistics.median(times)}


def _inputs(batch: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rainy = rng.uniform(size=(batch, height, width, 3)).astype(np.float32)
    clean = np.clip(rainy - 0.1 * rng.uniform(size=rainy.shape), 0, 1).astype(np.float32)
    return rainy, clean


def build_model(args: argparse.Namespace) -> DRSformer:
    return from_config(dict(dim=args.dim, num_blocks=args.num_blocks, heads=args.heads,
                            use_mefc=args.use_mefc, dtype=args.dtype, remat=args.remat,
                            conv_impl=args.conv_impl, layout=args.layout,
                            matmul_precision=args.matmul_precision))


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def _peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _memory(compiled: Any) -> dict[str, Any]:
    """The compiled program's buffers (XLA's memory_analysis), in bytes, where it has one."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        mem = None
    if mem is None:
        return {}
    fields = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes",
              "output_bytes": "output_size_in_bytes", "alias_bytes": "alias_size_in_bytes"}
    out = {k: int(getattr(mem, v, 0) or 0) for k, v in fields.items()}
    out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    return out


def _flops(compiled: Any) -> float | None:
    """XLA's cost analysis of the compiled program: floating-point operations per call."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def _timed_program(compile_fn: Callable[[], Any], call: Callable[[Any], Any],
                   steps: int, warmup: int,
                   check: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Compiles once (timed), calls the compiled program once (timed: the first call),
    `warmup` more times, then `steps` timed calls. Every call goes to the one compiled
    executable, so nothing can recompile behind the timings (a changed argument type
    would be an error, not a silent second compilation). `check(compiled)` runs
    before the first call and may raise to stop a program that would not fit."""
    start = time.perf_counter()
    compiled = compile_fn()
    compile_s = time.perf_counter() - start
    if check is not None:
        check(compiled)
    start = time.perf_counter()
    call(compiled)
    first_call_s = time.perf_counter() - start
    for _ in range(warmup):
        call(compiled)
    result = time_calls(lambda: call(compiled), steps)
    return {"compile_s": compile_s, "first_call_s": first_call_s,
            "compile_and_first_call_s": compile_s + first_call_s, "warmup_calls": 1 + warmup,
            **result, "memory": _memory(compiled), "flops_per_call": _flops(compiled),
            "peak_rss_bytes": _peak_rss_bytes()}


def bench_jax_forward(model: DRSformer, params: Any, rainy: np.ndarray, steps: int,
                      warmup: int = 1,
                      check: Callable[[Any], None] | None = None) -> dict[str, Any]:
    variables = {"params": params}
    x = jnp.asarray(rainy)
    return _timed_program(lambda: jax.jit(model.apply).lower(variables, x).compile(),
                          lambda fn: _block(fn(variables, x)), steps, warmup, check)


def bench_jax_train(model: DRSformer, params: Any, rainy: np.ndarray, clean: np.ndarray,
                    steps: int, warmup: int = 1,
                    check: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Times `train.make_train_step`'s step, as `train_and_evaluate` runs it, on every device.

    The state is placed with the sharding the step gives its output state, so the one
    program compiled (`lower(...).compile()`) takes its own output back, call after call.
    """
    config = types.SimpleNamespace(**RELEASE_OPTIM, global_batch_size=rainy.shape[0])
    tx = train.create_optimizer(config)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    step = train.make_train_step(config, model, tx, mesh)
    state = jax.device_put(train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=tx.init(params)), step.state_sharding)
    batch = {"input": jax.device_put(rainy, step.batch_sharding),
             "target": jax.device_put(clean, step.batch_sharding)}
    box = {"state": state}

    def call(fn: Any) -> None:
        box["state"], metrics = fn(box["state"], batch)
        _block((box["state"], metrics))

    result = _timed_program(lambda: step.fn.lower(state, batch).compile(), call, steps, warmup,
                            check)
    return {"devices": mesh.shape["data"], "train_step": "drsformer_jax.train.make_train_step",
            **result}


def load_release_model(reference_repo: Path, args: argparse.Namespace) -> Any:
    """The release's DRSformer at this benchmark's size (`release.release_class`; a
    ReleaseError when the checkout or PyTorch is missing)."""
    cls = release_class(reference_repo, args.use_mefc, user="benchmark --compare-torch")
    return cls(dim=args.dim, num_blocks=list(args.num_blocks), heads=list(args.heads),
               ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias")


def bench_torch(reference_repo: Path, args: argparse.Namespace, rainy: np.ndarray,
                clean: np.ndarray) -> dict[str, Any]:
    import torch  # not a dependency: only --compare-torch needs it

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.torch_device)
    model = load_release_model(reference_repo, args).to(device)
    x = torch.from_numpy(rainy).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(clean).permute(0, 3, 1, 2).contiguous().to(device)

    def autocast() -> Any:
        if not args.torch_autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out: dict[str, Any] = {"torch_version": torch.__version__, "device": str(device),
                           "threads": torch.get_num_threads(),
                           "dtype": "autocast_bfloat16" if args.torch_autocast_bf16 else "float32",
                           "params": sum(p.numel() for p in model.parameters())}
    if "forward" in args.modes:
        model.eval()

        def forward() -> None:
            with torch.no_grad(), autocast():
                model(x)
            sync()

        forward()  # warm-up
        out["forward"] = time_calls(forward, args.steps)
    if "train" in args.modes:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=RELEASE_OPTIM["learning_rate"],
                                betas=(RELEASE_OPTIM["adam_b1"], RELEASE_OPTIM["adam_b2"]),
                                weight_decay=RELEASE_OPTIM["weight_decay"])

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.l1_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), RELEASE_OPTIM["grad_clip_norm"])
            opt.step()
            sync()

        step()  # warm-up
        out["train"] = time_calls(step, args.steps)
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drsformer_jax.benchmark",
                                description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--modes", default="forward,train",
                   help="comma-separated subset of: forward, train")
    p.add_argument("--remat", action="store_true", help="rematerialise blocks and MEFC")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="activation layout inside the model")
    p.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                   help="depthwise / grouped convolution formulation")
    p.add_argument("--matmul-precision", choices=("default", "high", "highest"),
                   default="default",
                   help="of matmuls and convolutions: default is TF32 on recent NVIDIA GPUs "
                        "and bfloat16 passes on TPUs; highest is true float32")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls after the first call, before the timed ones")
    p.add_argument("--no-mefc", dest="use_mefc", action="store_false",
                   help="the variant without MEFC (Rain200L / SPA-Data)")
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--num-blocks", type=int, nargs=4, default=[4, 6, 6, 8])
    p.add_argument("--heads", type=int, nargs=4, default=[1, 2, 4, 8])
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the release's PyTorch model in this run")
    p.add_argument("--reference-repo", type=Path, help="checkout of the DRSformer release")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads (0: PyTorch's default)")
    p.add_argument("--torch-device", default="cpu", help="the release's device (cpu, cuda)")
    p.add_argument("--torch-autocast-bf16", action="store_true",
                   help="run the release under torch.autocast(bfloat16)")
    p.add_argument("--json", type=Path, help="also write the result here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        p.error(f"--modes must be a comma-separated subset of {MODES}, got {unknown}")
    if args.compare_torch and args.reference_repo is None:
        p.error("--compare-torch needs --reference-repo PATH/TO/DRSformer")
    if args.height % 8 or args.width % 8:
        p.error("--height and --width must be multiples of 8")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args)
    params = init_params(model, 0)
    rainy, clean = _inputs(args.batch, args.height, args.width)
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "device": {"platform": device.platform, "kind": device.device_kind,
                   "count": jax.device_count(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine()},
        "jax_version": jax.__version__,
        "height": args.height, "width": args.width, "batch": args.batch, "dtype": args.dtype,
        "steps": args.steps, "warmup": args.warmup, "remat": args.remat,
        "matmul_precision": args.matmul_precision,
        "layout": resolve_layout(args.layout, device.platform),
        "conv_impl": resolve_conv_impl(args.conv_impl, device.platform),
        "model": model.config(), "params": count_params(params),
        "command": "python -m drsformer_jax.benchmark " + " ".join(args.argv),
    }
    pixels = args.batch * args.height * args.width
    if "forward" in args.modes:
        fwd = bench_jax_forward(model, params, rainy, args.steps, args.warmup)
        fwd["images_per_s"] = args.batch / fwd["median_s"]
        fwd["megapixels_per_s"] = pixels / fwd["median_s"] / 1e6
        result["forward"] = fwd
    if "train" in args.modes:
        tr = bench_jax_train(model, params, rainy, clean, args.steps, args.warmup)
        tr["images_per_s"] = args.batch / tr["median_s"]
        result["train"] = tr
    if args.compare_torch:
        ref = bench_torch(args.reference_repo, args, rainy, clean)
        result["torch"] = ref
        result["ratio_to_torch"] = {m: result[m]["median_s"] / ref[m]["median_s"]
                                    for m in args.modes if m in ref}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    for mode, ratio in result.get("ratio_to_torch", {}).items():
        print(f"{mode}: ours {result[mode]['median_s']:.3f} s, PyTorch "
              f"{result['torch'][mode]['median_s']:.3f} s, ratio {ratio:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

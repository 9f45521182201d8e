"""Times DRSformer's forward pass and full train step; optionally the release's PyTorch model.

    python -m drsformer_jax.benchmark --height 256 --width 256 --batch 1 --steps 3
    python -m drsformer_jax.benchmark --compare-torch --reference-repo PATH/TO/DRSformer \\
        --modes forward --json bench.json

Every figure is taken after compilation (and, for PyTorch, after one warm-up
call) and is the median of `--steps` timed calls on the same input. Weights are
random (PyTorch's default initialisation on both sides): the cost is the
converted weights'. The train step is the whole update, L1 loss, gradient,
global-norm clipping and AdamW: the step `train_and_evaluate` runs
(`train.make_train_step`, the batch sharded over every device), with the
release's optimizer settings; the PyTorch train step is the release's
(torch.optim.AdamW, clip_grad_norm_, L1 loss). `--compare-torch` imports the
release's architecture file from `--reference-repo` (nothing of it is copied
here) and runs it on the same inputs, on CPU, in the same process, and reports
our time over PyTorch's. The result is printed as JSON and written to `--json`.

This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from runpy import run_path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from drsformer_jax import train
from drsformer_jax.model.convolution import resolve_conv_impl, resolve_layout
from drsformer_jax.model.drsformer import DTYPES, DRSformer, count_params, from_config, init_params

MODES = ("forward", "train")
# The release's optimisation settings (Options/Deraining.yml).
RELEASE_OPTIM = dict(learning_rate=3e-4, min_learning_rate=1e-6, lr_constant_steps=92_000,
                     lr_cosine_steps=208_000, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
                     weight_decay=1e-4, grad_clip_norm=0.01, seed=100)
ARCH_FILES = {True: "DRSformer_arch.py", False: "DRSformer_arch_200L+SPA.py"}


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
                            conv_impl=args.conv_impl, layout=args.layout))


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def bench_jax_forward(model: DRSformer, params: Any, rainy: np.ndarray,
                      steps: int) -> dict[str, Any]:
    fn = jax.jit(model.apply)
    x = jnp.asarray(rainy)
    start = time.perf_counter()
    _block(fn({"params": params}, x))
    compile_s = time.perf_counter() - start
    result = time_calls(lambda: _block(fn({"params": params}, x)), steps)
    return {"compile_and_first_call_s": compile_s, **result}


def bench_jax_train(model: DRSformer, params: Any, rainy: np.ndarray, clean: np.ndarray,
                    steps: int) -> dict[str, Any]:
    """Times `train.make_train_step`'s step, as `train_and_evaluate` runs it, on every device."""
    config = ml_collections.ConfigDict(dict(RELEASE_OPTIM, global_batch_size=rainy.shape[0]))
    tx = train.create_optimizer(config)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    step = train.make_train_step(config, model, tx, mesh)
    state = jax.device_put(train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=tx.init(params)), step.state_sharding)
    batch = {"input": jax.device_put(rainy, step.batch_sharding),
             "target": jax.device_put(clean, step.batch_sharding)}
    box = {"state": state}

    def call() -> None:
        box["state"], metrics = step.fn(box["state"], batch)
        _block(metrics)

    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    result = time_calls(call, steps)
    return {"compile_and_first_call_s": compile_s, "devices": mesh.shape["data"],
            "train_step": "drsformer_jax.train.make_train_step", **result}


def load_release_model(reference_repo: Path, args: argparse.Namespace) -> Any:
    """The release's DRSformer class, imported from its checkout (as the parity tool does)."""
    path = Path(reference_repo) / "basicsr" / "models" / "archs" / ARCH_FILES[args.use_mefc]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --reference-repo must be a checkout of "
                                f"the DRSformer release")
    cls = run_path(str(path))["DRSformer"]
    return cls(dim=args.dim, num_blocks=list(args.num_blocks), heads=list(args.heads),
               ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias")


def bench_torch(reference_repo: Path, args: argparse.Namespace, rainy: np.ndarray,
                clean: np.ndarray) -> dict[str, Any]:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = load_release_model(reference_repo, args)
    x = torch.from_numpy(rainy).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(clean).permute(0, 3, 1, 2).contiguous()
    out: dict[str, Any] = {"torch_version": torch.__version__,
                           "threads": torch.get_num_threads(),
                           "params": sum(p.numel() for p in model.parameters())}
    if "forward" in args.modes:
        model.eval()
        with torch.no_grad():
            model(x)  # warm-up
            out["forward"] = time_calls(lambda: model(x), args.steps)
    if "train" in args.modes:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=RELEASE_OPTIM["learning_rate"],
                                betas=(RELEASE_OPTIM["adam_b1"], RELEASE_OPTIM["adam_b2"]),
                                weight_decay=RELEASE_OPTIM["weight_decay"])

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.l1_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), RELEASE_OPTIM["grad_clip_norm"])
            opt.step()

        step()  # warm-up
        out["train"] = time_calls(step, args.steps)
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
    p.add_argument("--layout", default="auto", help="auto, NHWC or NCHW (inside the model)")
    p.add_argument("--conv-impl", default="auto", help="auto, xla or shift")
    p.add_argument("--no-mefc", dest="use_mefc", action="store_false",
                   help="the variant without MEFC (Rain200L / SPA-Data)")
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--num-blocks", type=int, nargs=4, default=[4, 6, 6, 8])
    p.add_argument("--heads", type=int, nargs=4, default=[1, 2, 4, 8])
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the release's PyTorch model (CPU) in this run")
    p.add_argument("--reference-repo", type=Path, help="checkout of the DRSformer release")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads (0: PyTorch's default)")
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
        "steps": args.steps, "remat": args.remat,
        "layout": resolve_layout(args.layout), "conv_impl": resolve_conv_impl(args.conv_impl),
        "model": model.config(), "params": count_params(params),
        "command": "python -m drsformer_jax.benchmark " + " ".join(args.argv),
    }
    pixels = args.batch * args.height * args.width
    if "forward" in args.modes:
        fwd = bench_jax_forward(model, params, rainy, args.steps)
        fwd["images_per_s"] = args.batch / fwd["median_s"]
        fwd["megapixels_per_s"] = pixels / fwd["median_s"] / 1e6
        result["forward"] = fwd
    if "train" in args.modes:
        tr = bench_jax_train(model, params, rainy, clean, args.steps)
        tr["images_per_s"] = args.batch / tr["median_s"]
        result["train"] = tr
    if args.compare_torch:
        ref = bench_torch(args.reference_repo, args, rainy, clean)
        ref["dtype"] = "float32"
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

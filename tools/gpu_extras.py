"""The measurements of tools/gpu_benchmark.sh: one JAX process, one PyTorch process.

    python tools/gpu_extras.py jax --json jax.json --deadline 290 [--tiny]
    python tools/gpu_extras.py torch --json torch.json --deadline 110 \\
        --reference-repo PATH/TO/DRSformer-release --device cuda [--tiny]
    python tools/gpu_extras.py summary jax.json torch.json --out gpu_benchmark.json

`jax`: the runs of `plan()` in order (train steps, forward passes), each compiled
ahead of time and checked against the device's free memory (XLA's memory_analysis
of the compiled program) before anything of it executes; a program that cannot fit
is recorded as skipped, with its memory. Then, from the programs already compiled:
the largest 128x128 train batch (the line through the two float32 train batches'
memory, checked by one step at the predicted batch, stepping down with fresh
arguments while it fails), the same line with remat (two compiles, nothing run),
and inference memory per pixel (the two forward sizes). `--tiny` runs a tiny model
with the GPU formulation (`for_platform("cuda")`: xla convolutions, NHWC) on the
host, so the GPU program is what gets checked.

`torch`: the release's model on the same runs, on `--device`; before a run its peak
memory is predicted from the smaller run of the same kind and the run skipped if
the prediction exceeds the device's free memory.

Each process stops starting runs when its `--deadline` (seconds) is near, and
rewrites its JSON after every run, so a run killed by the script's timeout keeps
what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drsformer_jax import benchmark, train  # noqa: E402
from drsformer_jax.model.drsformer import from_config, init_params  # noqa: E402
from drsformer_jax.release import RELEASE_OPTIM, ReleaseError  # noqa: E402

TINY_ARCH = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2))
FULL_ARCH = dict(dim=48, num_blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8))
# Share of the device's memory kept free of a program's own estimate (allocator
# fragmentation, cuDNN workspaces chosen at run time).
MARGIN = 0.05
MAX_STEP_DOWN_TRIES = 3
# Dense TFLOP/s of H100/H200 SXM for what XLA runs: float32 at the default matmul
# precision is TF32 there; only "highest" is true float32.
PEAK = {("bfloat16", "default"): 990e12, ("bfloat16", "highest"): 990e12,
        ("float32", "default"): 495e12, ("float32", "highest"): 67e12}
MACS_256 = 242.9e9  # multiply-adds per 256x256 forward


@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement, the same for both frameworks."""

    mode: str  # "train" or "forward"
    batch: int
    size: int
    dtype: str  # "float32" or "bfloat16" (PyTorch: float32 or autocast bfloat16)

    @property
    def name(self) -> str:
        what = f"b{self.batch}" if self.mode == "train" else str(self.size)
        return f"{self.mode}_{what}_{self.dtype}"


def plan(tiny: bool) -> list[Run]:
    """The runs, most wanted first (a run the deadline cuts off is the last one's)."""
    size, (big, small), fwd = (16, (4, 2), (32, 64)) if tiny else (128, (16, 8), (256, 512))
    return [Run("train", big, size, "float32"), Run("train", small, size, "float32"),
            Run("train", big, size, "bfloat16"),
            Run("forward", 1, fwd[0], "float32"), Run("forward", 1, fwd[0], "bfloat16"),
            Run("forward", 1, fwd[1], "float32"), Run("forward", 1, fwd[1], "bfloat16"),
            Run("train", small, size, "bfloat16")]


class DoesNotFitError(Exception):
    """A compiled program that needs more memory than the device has free."""

    def __init__(self, reason: str, memory: dict[str, int]) -> None:
        super().__init__(reason)
        self.memory = memory


class Clock:
    """The process's deadline: a run starts only if the longest of its kind so far fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.longest: dict[str, float] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def why_not(self, kind: str) -> str | None:
        need, left = self.longest.get(kind, 1.0), self.left()
        if need > left:
            return f"deadline: a {kind} run took up to {need:.0f} s, {left:.0f} s left"
        return None

    def record(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)


def write_json(path: Path, data: Any) -> None:
    """Whole-file replace: a kill mid-write leaves the previous version."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


# --- JAX ------------------------------------------------------------------------------

def needed_bytes(memory: dict[str, int]) -> int:
    """New allocations a call makes: temporaries and outputs not aliased to (donated)
    arguments; the arguments are already on the device."""
    return memory["temp_bytes"] + memory["output_bytes"] - memory["alias_bytes"]


def peak_bytes(memory: dict[str, int]) -> int:
    """Arguments, temporaries and outputs less the aliased: compile_report's `peak`."""
    return memory["total_bytes"] - memory["alias_bytes"]


def device_memory() -> tuple[int, int]:
    """(limit, free) bytes of the first device: the allocator's on GPUs; on the host
    (no memory_stats), the memory the kernel says is available, for both."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    if "bytes_limit" in stats:
        limit = int(stats["bytes_limit"])
        return limit, limit - int(stats.get("bytes_in_use", 0))
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    available = int(info["MemAvailable"].split()[0]) * 1024
    return available, available


def memory_check(limit_and_free: Callable[[], tuple[int, int]] = device_memory
                 ) -> Callable[[Any], None]:
    """benchmark's `check`: raises DoesNotFitError before a program that cannot fit runs."""

    def check(compiled: Any) -> None:
        memory = benchmark._memory(compiled)
        if not memory:
            return  # no memory_analysis on this backend: nothing to check against
        limit, free = limit_and_free()
        need = needed_bytes(memory)
        if need > free - MARGIN * limit:
            raise DoesNotFitError(f"needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free "
                             f"(less {MARGIN:.0%} of {limit / 2**30:.1f} GiB)", memory)
    return check


def build_model(tiny: bool, dtype: str, remat: str = "none") -> Any:
    """The model as the device's platform compiles it; `tiny`: the GPU's program on the host."""
    model = from_config(dict(TINY_ARCH if tiny else FULL_ARCH, use_mefc=True, dtype=dtype,
                             remat=remat))
    return model.for_platform("cuda" if tiny else jax.devices()[0].platform)


class JaxRunner:
    """Runs `plan()` in one process; parameters sampled once, fresh device copies per run."""

    def __init__(self, tiny: bool, steps: int, warmup: int, clock: Clock, out: Path) -> None:
        self.tiny, self.steps, self.warmup, self.clock, self.out = tiny, steps, warmup, clock, out
        self.host_params = jax.device_get(init_params(build_model(tiny, "float32"), 0))
        device = jax.devices()[0]
        limit, _ = device_memory()
        formulation = build_model(tiny, "float32")
        self.result: dict[str, Any] = {
            "device": {"platform": device.platform, "kind": device.device_kind,
                       "count": jax.device_count(), "memory_limit_bytes": limit},
            "jax_version": jax.__version__, "python": sys.executable,
            "formulation": {"conv_impl": formulation.conv_impl, "layout": formulation.layout,
                            "recompute": formulation.recompute},
            "tiny": tiny, "steps": steps, "runs": {}}

    def save(self) -> None:
        write_json(self.out, self.result)

    def measure(self, run: Run) -> dict[str, Any]:
        model = build_model(self.tiny, run.dtype)
        params = jax.device_put(self.host_params)  # donated by the train step: a fresh copy
        rainy, clean = benchmark._inputs(run.batch, run.size, run.size)
        check = memory_check()
        if run.mode == "train":
            r = benchmark.bench_jax_train(model, params, rainy, clean, self.steps, self.warmup,
                                          check)
        else:
            r = benchmark.bench_jax_forward(model, params, rainy, self.steps, self.warmup, check)
        r["images_per_s"] = run.batch / r["median_s"]
        return r

    def run_all(self) -> None:
        for run in plan(self.tiny):
            self.result["runs"][run.name] = self.attempt(run.mode, lambda r=run: self.measure(r),
                                                         dataclasses.asdict(run))
            self.save()

    def attempt(self, kind: str, fn: Callable[[], dict[str, Any]],
                fields: dict[str, Any]) -> dict[str, Any]:
        """One run, timed against the deadline; a failure is recorded, never fatal."""
        reason = self.clock.why_not(kind)
        if reason:
            print(f"== skip {fields}: {reason}", file=sys.stderr)
            return {**fields, "skipped": reason}
        print(f"== {kind} {fields}", file=sys.stderr)
        start = time.monotonic()
        try:
            out = {**fields, **fn()}
        except DoesNotFitError as e:
            out = {**fields, "skipped": str(e), "memory": e.memory}
        except Exception as e:  # noqa: BLE001 - out of memory surfaces as various errors
            out = {**fields, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            gc.collect()  # the run's device buffers go before the next run's check
        self.clock.record(kind, time.monotonic() - start)
        return out

    # Figures from the compiled programs -------------------------------------------------

    def compiled_train_memory(self, batch: int, remat: str) -> dict[str, int]:
        """A float32 train step's memory at `batch`, compiled and not run."""
        model = build_model(self.tiny, "float32", remat)
        config = types.SimpleNamespace(**RELEASE_OPTIM, global_batch_size=batch)
        step, state, data = train_arguments(model, config, self.host_params, batch, self.size)
        return benchmark._memory(step.fn.lower(state, data).compile())

    @property
    def size(self) -> int:
        return plan(self.tiny)[0].size

    def extras(self) -> None:
        runs = self.result["runs"]
        big, small = (r for r in plan(self.tiny)[:2])
        limit, _ = device_memory()
        lines: dict[str, Any] = {}
        memory = {r.batch: runs.get(r.name, {}).get("memory") for r in (big, small)}
        if all(memory.values()):
            lines["none"] = batch_line({b: peak_bytes(m) for b, m in memory.items()}, limit)
        remat = self.attempt("train", lambda: {"peak_bytes": {
            b: peak_bytes(self.compiled_train_memory(b, "blocks"))
            for b in (small.batch, big.batch)}}, {"remat": "blocks"})
        if "peak_bytes" in remat:
            lines["blocks"] = batch_line(remat["peak_bytes"], limit)
        else:
            lines["blocks"] = remat
        self.result["largest_batch"] = lines
        self.save()
        guess = lines.get("none", {}).get("predicted")
        if guess:
            if self.tiny:  # the host's memory would predict thousands of images
                guess = min(guess, 2 * big.batch)
            check = memory_check()
            lines["none"].update(self.attempt("train", lambda: step_down(
                lambda b: self.one_step(b, check), guess, self.clock), {}))
        self.result["inference_memory"] = inference_memory(runs, plan(self.tiny))
        self.save()

    def one_step(self, batch: int, check: Callable[[Any], None]) -> None:
        """Compiles, checks and runs one float32 train step on fresh arguments."""
        model = build_model(self.tiny, "float32")
        config = types.SimpleNamespace(**RELEASE_OPTIM, global_batch_size=batch)
        step, state, data = train_arguments(model, config, self.host_params, batch, self.size)
        compiled = step.fn.lower(state, data).compile()
        check(compiled)
        jax.block_until_ready(compiled(state, data))


def train_arguments(model: Any, config: Any, host_params: Any, batch: int,
                    size: int) -> tuple[Any, Any, dict[str, Any]]:
    """The train step over this process's one device and newly placed arguments for it:
    the step donates its state, so arguments are never reused across calls."""
    from jax.sharding import Mesh

    tx = train.create_optimizer(config)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    step = train.make_train_step(config, model, tx, mesh)
    params = jax.device_put(host_params)
    state = jax.device_put(train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=tx.init(params)), step.state_sharding)
    x = jax.device_put(np.full((batch, size, size, 3), 0.5, np.float32), step.batch_sharding)
    return step, state, {"input": x, "target": x}


def batch_line(peak: dict[int, int], limit: int) -> dict[str, Any]:
    """Memory is affine in the batch: the line through two batches' peaks, and the
    largest batch under (1 - MARGIN) of the device's limit."""
    (b1, m1), (b2, m2) = sorted((int(b), int(m)) for b, m in peak.items())
    per_image = max((m2 - m1) / (b2 - b1), 1.0)
    fixed = m1 - per_image * b1
    return {"peak_bytes": {b1: m1, b2: m2}, "bytes_per_image": per_image,
            "fixed_bytes": fixed,
            "predicted": max(int(((1 - MARGIN) * limit - fixed) // per_image), 0)}


def step_down(try_batch: Callable[[int], None], guess: int, clock: Clock | None = None,
              tries: int = MAX_STEP_DOWN_TRIES) -> dict[str, Any]:
    """The largest batch from `guess` down (by 1/8 a try) for which `try_batch` returns.

    `try_batch` must build its own arguments each call: a donated train step deletes
    them even when the call then fails."""
    out: dict[str, Any] = {"failed_batches": []}
    batch = guess
    for _ in range(tries):
        if batch < 1 or (clock is not None and clock.left() <= 0):
            break
        try:
            try_batch(batch)
            out["largest_fitting"] = batch
            break
        except Exception as e:  # noqa: BLE001 - out of memory surfaces as various errors
            out["failed_batches"].append([batch, f"{type(e).__name__}: {str(e)[:200]}"])
            batch -= max(batch // 8, 1)
    return out


def inference_memory(runs: dict[str, Any], runs_plan: list[Run]) -> list[dict[str, Any]]:
    """Forward memory per pixel: the difference of the two sizes' compiled peaks."""
    out = []
    for dtype in ("float32", "bfloat16"):
        fwd = [r for r in runs_plan if r.mode == "forward" and r.dtype == dtype]
        mem = [runs.get(r.name, {}).get("memory") for r in fwd]
        if len(fwd) == 2 and all(mem):
            (a, ma), (b, mb) = ((r.size, peak_bytes(m)) for r, m in zip(fwd, mem, strict=True))
            out.append({"dtype": dtype, "peak_bytes_at_size": {a: ma, b: mb},
                        "bytes_per_pixel": (mb - ma) / (b * b - a * a)})
    return out


def main_jax(args: argparse.Namespace) -> int:
    runner = JaxRunner(args.tiny, args.steps, args.warmup, Clock(args.deadline), args.json)
    runner.save()
    runner.run_all()
    runner.extras()
    return 0


# --- PyTorch --------------------------------------------------------------------------

def torch_args(run: Run, args: argparse.Namespace) -> argparse.Namespace:
    arch = TINY_ARCH if args.tiny else FULL_ARCH
    return argparse.Namespace(
        dim=arch["dim"], num_blocks=arch["num_blocks"], heads=arch["heads"], use_mefc=True,
        torch_threads=0, torch_device=args.device, modes=[run.mode], steps=args.steps,
        torch_autocast_bf16=run.dtype == "bfloat16")


def predicted_peak(run: Run, measured: dict[Run, int]) -> int | None:
    """The release's peak memory at `run`, scaled by pixels from a smaller measured run
    of the same mode and dtype (an upper bound: the fixed part scales too)."""
    pixels = run.batch * run.size ** 2
    known = [(r.batch * r.size ** 2, peak) for r, peak in measured.items()
             if r.mode == run.mode and r.dtype == run.dtype and r.batch * r.size ** 2 < pixels]
    if not known:
        return None
    px, peak = max(known)
    return int(peak * pixels / px)


def main_torch(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"runs": {}, "device": args.device}
    try:
        import torch  # not a dependency of the project: only this comparison needs it

        result["torch_version"] = torch.__version__
        benchmark.load_release_model(args.reference_repo, torch_args(plan(True)[0], args))
    except (ImportError, ReleaseError, TypeError) as e:
        result["unavailable"] = f"{type(e).__name__}: {e}"
        print(f"PyTorch comparison unavailable: {result['unavailable']}", file=sys.stderr)
        write_json(args.json, result)
        return 0
    cuda = args.device.startswith("cuda")
    clock, measured = Clock(args.deadline), {}
    # The plan's order of kinds, smallest first within each, so each larger run has a
    # measured peak to scale.
    runs = plan(args.tiny)
    kinds = list(dict.fromkeys((r.mode, r.dtype) for r in runs))
    for run in sorted(runs, key=lambda r: (kinds.index((r.mode, r.dtype)), r.batch * r.size)):
        fields, reason = dataclasses.asdict(run), clock.why_not(run.mode)
        predicted = predicted_peak(run, measured) if cuda else None
        if cuda and predicted is not None and not reason:
            free, total = torch.cuda.mem_get_info()
            if predicted > free - MARGIN * total:
                reason = (f"predicted {predicted / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free")
        if reason:
            result["runs"][run.name] = {**fields, "skipped": reason}
            write_json(args.json, result)
            continue
        print(f"== torch {run.name}", file=sys.stderr)
        start = time.monotonic()
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rainy, clean = benchmark._inputs(run.batch, run.size, run.size)
            r = benchmark.bench_torch(args.reference_repo, torch_args(run, args), rainy, clean)
            if "peak_memory_bytes" in r:
                measured[run] = r["peak_memory_bytes"]
            result["runs"][run.name] = {**fields, **r, "predicted_peak_bytes": predicted}
        except Exception as e:  # noqa: BLE001 - out of memory among others: recorded
            result["runs"][run.name] = {**fields, "failed": f"{type(e).__name__}: {e}"[:300]}
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        clock.record(run.mode, time.monotonic() - start)
        write_json(args.json, result)
    return 0


# --- the table --------------------------------------------------------------------------

def summarise(ours: dict[str, Any], ref: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Both processes' JSON in one, with model FLOP utilisation, and the printed table."""
    lines = [f"{'run':24} {'ours':>11} {'release':>11} {'ratio':>7} {'compile':>9} {'MFU':>7}"]
    for name, r in ours.get("runs", {}).items():
        t = ref.get("runs", {}).get(name, {})
        ref_s = t.get(r["mode"], {}).get("median_s")
        if "median_s" not in r:
            why = r.get("skipped") or r.get("failed") or "not run"
            lines.append(f"{name:24} {'skipped' if 'skipped' in r else 'FAILED'}: {why}")
            continue
        px = r["batch"] * r["size"] ** 2
        flops = r.get("flops_per_call") or (
            2 * MACS_256 * px / 65536 * (3 if r["mode"] == "train" else 1))
        r["model_flops_utilisation"] = mfu = flops / r["median_s"] / PEAK[r["dtype"], "default"]
        ours_s = r["median_s"]
        release = f"{ref_s * 1e3:.1f} ms" if ref_s else "-"
        ratio = f"{ours_s / ref_s:.2f}x" if ref_s else "-"
        lines.append(f"{name:24} {ours_s * 1e3:8.1f} ms {release:>11} {ratio:>7} "
                     f"{r['compile_s']:7.1f} s {100 * mfu:6.1f} %")
    if ref.get("unavailable"):
        lines.append(f"release: unavailable ({ref['unavailable']})")
    for name, t in ref.get("runs", {}).items():
        if "skipped" in t or "failed" in t:
            lines.append(f"release {name}: {t.get('skipped') or t.get('failed')}")
    for mode, line in ours.get("largest_batch", {}).items():
        lines.append(f"largest train batch, remat {mode}: predicted {line.get('predicted')}, "
                     f"ran {line.get('largest_fitting')}")
    for m in ours.get("inference_memory", []):
        lines.append(f"inference bytes/pixel {m['dtype']}: {m['bytes_per_pixel']:.1f}")
    return {"jax": ours, "torch": ref}, lines


def main_summary(args: argparse.Namespace) -> int:
    def load(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return {"unavailable": f"{path.name}: {e}"}

    merged, lines = summarise(load(args.jax_json), load(args.torch_json))
    print("\n".join(lines))
    write_json(args.out, merged)
    print("wrote", args.out)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("jax", "torch"):
        s = sub.add_parser(name)
        s.add_argument("--json", type=Path, required=True)
        s.add_argument("--deadline", type=float, required=True,
                       help="seconds: no run starts that would likely end after it")
        s.add_argument("--steps", type=int, default=5)
        s.add_argument("--warmup", type=int, default=1, help="JAX: untimed calls after the first")
        s.add_argument("--tiny", action="store_true")
    sub.choices["torch"].add_argument("--reference-repo", type=Path, required=True)
    sub.choices["torch"].add_argument("--device", default="cuda")
    s = sub.add_parser("summary")
    s.add_argument("jax_json", type=Path)
    s.add_argument("torch_json", type=Path)
    s.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"jax": main_jax, "torch": main_torch, "summary": main_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

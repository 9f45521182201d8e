"""Per-chip memory and cost of the train step and the forward pass on a TPU or GPU,
from the accelerator's own compiler, on any host (nothing runs on a device).

    python -m drsformer_jax.compile_report --target tpu:v5e-4 --programs train,forward
    python -m drsformer_jax.compile_report --target cuda:h100 --batch 16 --dtype bfloat16

Deviceless ahead-of-time compilation: the target's devices come from
`jax.experimental.topologies.get_topology_desc` (libtpu for TPUs; the CUDA PJRT
plugin and one of XLA's GPU target descriptions, `drsformer_jax/aot_targets/`,
for GPUs), the programs are built as the project builds them (`train`:
`train.make_train_step` over a mesh of every chip of the target, the batch
sharded, the state replicated and donated, exactly as `train_and_evaluate`
compiles it; `forward`: the Restorer's `model.apply` on one chip) and compiled
with `jit(...).lower(...).compile()`. The compilers need the optional extra
(`pip install -e .[aot]`, see docs/accelerators.md); `--target cpu` works without.

Reported per chip: XLA's buffer assignment (temporaries, arguments, outputs,
aliased, and `peak` = their sum less the aliased bytes), FLOPs and bytes accessed
(XLA's cost analysis; the lowered program's where the compiled one has none), the
compile time, the largest instruction outputs of the optimized program with the
model operation that makes them, and, with `--max-batch`, the largest per-chip
batch that fits for each `--remat` mode: memory is affine in the batch, so two
compiles (1 and 2 images per chip) give the line, and one more at the predicted
batch checks it. A TPU
compiler refuses a program that does not fit ("exceeds available HBM"); that is
reported as such. A GPU compiler never refuses: there "fits" means within JAX's
default preallocation (75 % of the device memory, `XLA_PYTHON_CLIENT_MEM_FRACTION`).
The JSON goes to stdout and `--json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import xla_bridge  # XLA's HLO cost model, for compilers that give none
from jax._src.lib import _jax
from jax.experimental import topologies
from jax.sharding import Mesh, SingleDeviceSharding

from drsformer_jax.model.convolution import CONV_IMPLS, LAYOUTS
from drsformer_jax.model.drsformer import (
    DTYPES,
    REMAT,
    DRSformer,
    abstract_params,
    from_config,
)
from drsformer_jax.release import RELEASE_OPTIM
from drsformer_jax.train import trainer

GIB = 2 ** 30
TARGET_DIR = Path(__file__).parent / "aot_targets"
# JAX's default preallocation on GPUs: what a program may use there.
GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip model: how to name it to the compiler and how much memory a program gets."""

    platform: str  # "tpu", "cuda", or "cpu" (this host)
    memory_bytes: int  # per chip, what a program may use
    topology: str = ""  # TPU: the topology's generation ("v5e"); GPU: XLA's target file
    chip_config: str = "default"  # TPU: "megacore" where two cores make one device
    by_cores: bool = False  # Cloud TPU names v4 / v5p slices by cores, 2 a chip


# TPUs: the HBM their compiler reports as available ("exceeds available HBM (15.75G)");
# GPUs: JAX's default preallocation of the device memory in XLA's target file.
TARGETS = {
    "tpu:v5e": Target("tpu", int(15.75 * GIB), "v5e"),
    "tpu:v6e": Target("tpu", int(31.25 * GIB), "v6e"),
    "tpu:v4": Target("tpu", int(30.75 * GIB), "v4", "megacore", by_cores=True),
    "tpu:v5p": Target("tpu", int(95.74 * GIB), "v5p", "megacore", by_cores=True),
    "cuda:h100": Target("cuda", int(GPU_MEMORY_FRACTION * 84942979072), "h100_sxm.txtpb"),
    "cuda:h200": Target("cuda", int(GPU_MEMORY_FRACTION * 151397597184), "h200.txtpb"),
    "cuda:a100": Target("cuda", int(GPU_MEMORY_FRACTION * 85100068864), "a100_sxm_80.txtpb"),
}
# One-host TPU slices: chips -> (topology dimensions, chips per host).
TPU_SHAPES = {1: ("1x1", (1, 1, 1)), 4: ("2x2", (2, 2, 1)), 8: ("2x4", (2, 4, 1))}
TPU_SHAPES_3D = {4: ("2x2x1", (2, 2, 1))}


def parse_target(text: str) -> tuple[Target, int]:
    """(target, chips) of "tpu:v5e-4" (v5e / v6e: chips; v4 / v5p: cores, as Cloud TPU
    names slices, so "tpu:v4-8" is 4 chips), "cuda:h100" or "cuda:h100-4" (GPUs), "cpu"."""
    if text == "cpu":
        return Target("cpu", 0), 0
    name, _, count = text.partition("-")
    target = TARGETS.get(name)
    if target is None or (count and not count.isdigit()):
        raise ValueError(f"--target {text!r}: expected one of "
                         f"{', '.join(k + '-N' for k in TARGETS)}, or cpu")
    n = int(count or 1)
    chips = n // 2 if target.by_cores else n
    shapes = TPU_SHAPES_3D if target.by_cores else TPU_SHAPES
    if target.platform == "tpu" and (chips not in shapes or (target.by_cores and n % 2)):
        sizes = sorted(k * 2 if target.by_cores else k for k in shapes)
        raise ValueError(f"--target {text!r}: one-host slices are {name}-"
                         f"{{{','.join(map(str, sizes))}}}")
    return target, chips


def target_devices(target: Target, chips: int) -> list[Any]:
    """Compile-only devices of `chips` chips of `target` (this host's devices for cpu)."""
    if target.platform == "cpu":
        return jax.devices()
    if target.platform == "tpu":
        dims, per_host = (TPU_SHAPES_3D if target.by_cores else TPU_SHAPES)[chips]
        # libtpu's start-up looks for a Cloud TPU VM unless told it is alone, and which.
        count = chips * 2 if target.by_cores else chips
        kind = {"v5e": "v5litepod"}.get(target.topology, target.topology)
        for key, value in {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_ID": "0",
                           "TPU_WORKER_HOSTNAMES": "localhost",
                           "TPU_ACCELERATOR_TYPE": f"{kind}-{count}"}.items():
            os.environ.setdefault(key, value)
        return list(topologies.get_topology_desc(
            topology_name=f"{target.topology}:{dims}", platform="tpu",
            chip_config_name=target.chip_config, chips_per_host_bounds=per_host,
            num_slices=1, wrap=(False, False, False)).devices)
    # jax-cuda12-pjrt 0.10.2 does not know this newer field of the target description.
    spec = "\n".join(line for line in (TARGET_DIR / target.topology).read_text().splitlines()
                     if "collective_memory_granularity" not in line)
    return list(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{chips}",
                                             target_config=spec).devices)


# --- programs --------------------------------------------------------------------------

def train_config(args: argparse.Namespace, batch_per_chip: int, chips: int,
                 remat: str) -> Any:
    """The release's recipe (`release.RELEASE_OPTIM`) with the released model's
    architecture, at this batch and crop."""
    config = ml_collections.ConfigDict(dict(
        RELEASE_OPTIM, global_batch_size=batch_per_chip * chips, crop_size=args.height,
        dtype=args.dtype, remat=remat, matmul_precision=args.matmul_precision,
        conv_impl=args.conv_impl, layout=args.layout))
    if args.model == "reduced":
        config.num_blocks = (1, 1, 1, 1)
    return config


def lower_train_step(config: Any, devices: Sequence[Any]) -> Any:
    """The train step `train_and_evaluate` compiles, lowered for `devices`."""
    model = trainer.create_model(config)
    tx = trainer.create_optimizer(config)
    mesh = Mesh(np.asarray(devices), ("data",))
    step = trainer.make_train_step(config, model, tx, mesh)
    state = jax.eval_shape(lambda: trainer.create_train_state(config, model, tx))
    side = int(config.crop_size)
    image = jax.ShapeDtypeStruct((int(config.global_batch_size), side, side, 3), jnp.float32)
    return step.fn.lower(state, {"input": image, "target": image})


def lower_forward(args: argparse.Namespace, device: Any, batch: int) -> Any:
    """The Restorer's forward pass (one chip, weights as an argument), lowered for `device`."""
    fields = dict(dtype=DTYPES[args.dtype], conv_impl=args.conv_impl, layout=args.layout,
                  matmul_precision=args.matmul_precision)
    if args.model == "reduced":
        fields["num_blocks"] = (1, 1, 1, 1)
    model = from_config({}, **fields).for_platform(device.platform)
    sharding = SingleDeviceSharding(device)
    params = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding),
        abstract_params(model))
    x = jax.ShapeDtypeStruct((batch, args.height, args.width, 3), jnp.float32,
                             sharding=sharding)
    return jax.jit(model.apply).lower({"params": params}, x)


def lower_block_residuals(config: Any, device: Any, channels: int, heads: int,
                          side: int) -> Any:
    """One transformer block's forward pass as the train step's model builds it, for
    `device`, returning what the backward pass keeps of it: the leaves of `jax.vjp`'s
    pullback (activations, and the weights in the forms a gradient reads them: an upper
    view, the train step holds the weights as arguments already)."""
    model = trainer.create_model(config).for_platform(device.platform)
    block = model.block(channels, heads)
    batch = int(config.global_batch_size)
    shape = (batch, channels, side, side) if block.channels_first else (batch, side, side,
                                                                        channels)
    sharding = SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct(shape, model.dtype, sharding=sharding)
    params = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding),
        jax.eval_shape(block.init, jax.random.PRNGKey(0), x)["params"])

    return jax.jit(functools.partial(residual_leaves, block)).lower(params, x)


def residual_leaves(module: Any, params: Any, x: jax.Array) -> list[jax.Array]:
    """What the backward pass of `module` applied to `x` keeps: the leaves of `jax.vjp`'s
    pullback."""
    _, pullback = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)
    return jax.tree_util.tree_leaves(pullback)


def train_state_bytes(config: Any) -> int:
    """Bytes of the train state (parameters, AdamW's moments, the step) on the host."""
    model, tx = trainer.create_model(config), trainer.create_optimizer(config)
    state = jax.eval_shape(lambda: trainer.create_train_state(config, model, tx))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(state))


def block_residuals(args: argparse.Namespace, target: Target, device: Any,
                    batch_per_chip: int) -> dict[str, Any]:
    """Per chip, what each kind of transformer block keeps for the backward pass (the
    compiled residual program's outputs, in the target's layouts; see
    `lower_block_residuals`), and what
    the full model holds beyond the reduced one (one block per stack): those of its
    extra blocks, and its larger train state (parameters and AdamW's moments, as the
    host lays them out). The full model's train step is about the reduced one's plus
    that, where the full compile is out of reach."""
    config = train_config(args, batch_per_chip, 1, args.remat)
    state_bytes = {model: train_state_bytes(train_config(
        argparse.Namespace(**{**vars(args), "model": model}), batch_per_chip, 1, args.remat))
        for model in ("full", "reduced")}
    kinds: dict[tuple[int, int, int], dict[str, Any]] = {}
    extra = 0
    for name, depth, channels, heads, factor in DRSformer().stacks():  # the release's
        side = args.height // factor
        key = (channels, heads, side)
        if key not in kinds:
            print(f"compiling one block's residuals ({batch_per_chip}x{side}x{side}x{channels})",
                  file=sys.stderr)
            result = compile_program(functools.partial(
                lower_block_residuals, config, device, channels, heads, side), target)
            kinds[key] = {"channels": channels, "heads": heads, "side": side,
                          "residual_bytes": result.get("memory", {}).get("output"),
                          "compile_s": result["compile_s"], "stacks": []}
        kinds[key]["stacks"].append(f"{name} x{depth}")
        extra += (depth - 1) * (kinds[key]["residual_bytes"] or 0)
    extra_state = state_bytes["full"] - state_bytes["reduced"]
    return {"batch_per_chip": batch_per_chip, "kinds": list(kinds.values()),
            "extra_blocks_residual_bytes": extra, "extra_state_bytes": extra_state,
            "full_minus_reduced_bytes": extra + extra_state}


# --- what a compiled program says ----------------------------------------------------------

def memory(compiled: Any) -> dict[str, int]:
    """XLA's buffer assignment per chip, in bytes; `peak` = temp + arguments + outputs
    - aliased (donated arguments reused as outputs)."""
    mem = compiled.memory_analysis()
    out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("temp", "argument", "output", "alias", "generated_code")}
    out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def cost(lowered: Any, compiled: Any, chips: int) -> dict[str, Any]:
    """FLOPs and bytes accessed per chip: the compiled program's analysis where the
    compiler gives one (TPU), else XLA's HLO cost model run over the lowered program
    on the host (XLA:GPU's analysis is empty): global and before optimisation, so
    divided by the chips, and its bytes count every unfused intermediate."""
    result = _first(compiled.cost_analysis())
    source = "compiled"
    if not (result and result.get("flops")):

        module = lowered._lowering.hlo().as_hlo_module()
        result = {k: v / chips for k, v in _jax.hlo_module_cost_analysis(
            xla_bridge.get_backend("cpu"), module).items()}
        source = "lowered, XLA's HLO cost model, unfused"
    if not result:
        return {}
    return {"flops": float(result.get("flops", 0.0)),
            "bytes_accessed": float(result.get("bytes accessed", 0.0)), "cost_source": source}


def _first(result: Any) -> dict[str, float] | None:
    if isinstance(result, list | tuple):
        return result[0] if result else None
    return result


_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NO_BUFFER = {"parameter", "get-tuple-element", "bitcast", "tuple"}  # views, inputs


def largest_buffers(hlo_text: str, count: int = 8) -> list[dict[str, Any]]:
    """The largest array-valued instructions of an optimized HLO module (an upper view of
    buffer sizes: XLA may share or alias them), with the JAX operation that made them."""
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m or m.group(2) not in _ITEM_BYTES or m.group(4) in _NO_BUFFER:
            continue
        _, dtype, dims, opcode = m.groups()
        size = _ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        name = _OP_NAME.search(line)
        op = name.group(1) if name else ""
        key = (f"{dtype}[{dims}]", opcode, op)
        entry = seen.setdefault(key, {"shape": key[0], "opcode": opcode, "op": op,
                                      "bytes": size, "count": 0})
        entry["count"] += 1
    return sorted(seen.values(), key=lambda e: -e["bytes"])[:count]


def compile_program(lower: Any, target: Target, chips: int = 1) -> dict[str, Any]:
    """Lowers and compiles one program; its figures, or the compiler's refusal."""
    start = time.perf_counter()
    lowered = lower()
    lower_s = time.perf_counter() - start
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the answer
        message = str(e).strip().splitlines()[0][:400]
        if "exceeds" in message or "RESOURCE_EXHAUSTED" in message:
            return {"fits": False, "refused": message, "lower_s": lower_s,
                    "compile_s": time.perf_counter() - start - lower_s}
        raise
    out = {"lower_s": lower_s, "compile_s": time.perf_counter() - start - lower_s,
           "memory": memory(compiled), **cost(lowered, compiled, chips),
           "largest_buffers": largest_buffers(compiled.as_text() or "")}
    if target.memory_bytes:
        out["fits"] = out["memory"]["peak"] <= target.memory_bytes
    return out


def max_batch(make: Any, target: Target) -> dict[str, Any]:
    """The largest per-chip batch whose peak fits `target`: the line through batches 1
    and 2, then a compile at the predicted batch (one smaller while it does not fit)."""
    one, two = make(1), make(2)
    if not one.get("memory") or not two.get("memory"):
        return {"max_batch": 0 if not one.get("fits", True) else None,
                "note": "batch 1 or 2 refused by the compiler"}
    base, slope = one["memory"]["peak"], two["memory"]["peak"] - one["memory"]["peak"]
    predicted = max(0, int((target.memory_bytes - (base - slope)) // max(slope, 1)))
    out = {"bytes_per_image": slope, "fixed_bytes": base - slope, "predicted": predicted}
    batch = predicted
    while batch > 2:
        check = make(batch)
        if check.get("fits"):
            out.update(max_batch=batch, checked_peak=check["memory"]["peak"])
            return out
        batch -= 1
    out["max_batch"] = 2 if two.get("fits") else 1 if one.get("fits") else 0
    return out


# --- the command ---------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help="tpu:v5e-{1,4,8}, tpu:v6e-{1,4,8}, tpu:v4-8, tpu:v5p-8, "
                        "cuda:h100[-N], cuda:h200[-N], cuda:a100[-N], or cpu")
    p.add_argument("--programs", default="train,forward",
                   help="train, forward, blocks (each kind of transformer block's residuals, "
                        "and the full model's train step estimated from the reduced one's), "
                        "comma-separated")
    p.add_argument("--batch", type=int, default=None,
                   help="global train batch (default: 1 image per chip)")
    p.add_argument("--forward-batch", type=int, default=1)
    p.add_argument("--height", type=int, default=128, help="train crop and forward height")
    p.add_argument("--width", type=int, default=None, help="forward width (default: height)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--matmul-precision", default="default",
                   choices=("default", "high", "highest"))
    p.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.add_argument("--remat", choices=REMAT, default="none",
                   help="recompute activations in the backward pass (see DRSformer.remat)")
    p.add_argument("--model", choices=("full", "reduced"), default="full",
                   help="reduced: one block per level (a quick look)")
    p.add_argument("--max-batch", action="store_true",
                   help="also find the largest per-chip train batch for each --remat mode")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.width = args.width or args.height
    args.programs = [s.strip() for s in args.programs.split(",") if s.strip()]
    if set(args.programs) - {"train", "forward", "blocks"}:
        p.error("--programs: train, forward, blocks")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:


    jax.config.update("jax_platforms", "cpu")  # the host backend; the target is compile-only
    target, chips = parse_target(args.target)
    devices = target_devices(target, chips)
    chips = len(devices)
    report: dict[str, Any] = {
        "target": args.target, "device_kind": devices[0].device_kind, "chips": chips,
        "platform": devices[0].platform, "usable_bytes_per_chip": target.memory_bytes,
        "jax": jax.__version__, "model": args.model, "dtype": args.dtype,
        "matmul_precision": args.matmul_precision, "conv_impl": args.conv_impl,
        "layout": args.layout, "remat": args.remat}
    batch = args.batch or chips  # the train step's and the blocks' global batch
    if batch % chips:
        raise ValueError(f"--batch {batch} is not a multiple of the {chips} chips")
    if "forward" in args.programs:
        print(f"compiling the forward pass ({args.forward_batch}x{args.height}x{args.width})",
              file=sys.stderr)
        report["forward"] = compile_program(
            lambda: lower_forward(args, devices[0], args.forward_batch), target)
    if "train" in args.programs:
        def make(per_chip: int, remat: str = args.remat) -> dict[str, Any]:
            print(f"compiling the train step ({per_chip} per chip x {chips} chips, "
                  f"remat={remat})", file=sys.stderr)
            config = train_config(args, per_chip, chips, remat)
            return compile_program(lambda: lower_train_step(config, devices), target, chips)

        report["train"] = {"global_batch": batch, **make(batch // chips)}
        if args.max_batch and target.memory_bytes:
            report["max_batch"] = {mode: max_batch(lambda b, m=mode: make(b, m), target)
                                   for mode in REMAT}
    if "blocks" in args.programs:
        report["blocks"] = block_residuals(args, target, devices[0], batch // chips)
        reduced = report.get("train", {}).get("memory")
        if args.model == "reduced" and reduced:
            estimate = reduced["peak"] + report["blocks"]["full_minus_reduced_bytes"]
            report["full_estimate"] = {"peak": estimate, "fits": (
                estimate <= target.memory_bytes if target.memory_bytes else None)}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

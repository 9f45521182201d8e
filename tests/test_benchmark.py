"""The benchmark CLI on a tiny configuration: fields and internal consistency only."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from drsformer_jax import benchmark
from tools import gpu_extras

# Without MEFC, whose programs are two thirds of a tiny model's (MEFC is the model tests').
TINY = ["--height", "16", "--width", "24", "--batch", "2", "--steps", "2", "--dim", "8",
        "--num-blocks", "1", "1", "1", "1", "--heads", "1", "1", "2", "2", "--no-mefc"]


def test_forward_and_train_step_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(TINY + ["--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    assert (result["height"], result["width"], result["batch"]) == (16, 24, 2)
    assert result["dtype"] == "float32" and result["model"]["dim"] == 8
    assert result["model"]["use_mefc"] is False
    assert result["layout"] in ("NHWC", "NCHW") and result["conv_impl"] in ("xla", "shift")
    assert result["params"] > 0 and result["device"]["platform"]
    for mode in ("forward", "train"):
        r = result[mode]
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert min(r["times_s"]) <= r["median_s"] <= max(r["times_s"])
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"])
        assert r["compile_s"] > 0 and r["first_call_s"] > 0
        assert r["compile_and_first_call_s"] == pytest.approx(r["compile_s"] + r["first_call_s"])
        assert r["peak_rss_bytes"] > 0
        if r["memory"]:
            assert r["memory"]["total_bytes"] >= r["memory"]["argument_bytes"] > 0
    assert "train_step" in result["train"]
    assert "torch" not in result and "ratio_to_torch" not in result
    assert result["command"].endswith("--json " + str(out))


def test_bfloat16_forward_only(capsys):
    assert benchmark.main(TINY + ["--dtype", "bfloat16", "--modes", "forward",
                                  "--layout", "NHWC", "--remat"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["layout"] == "NHWC" and result["remat"]
    assert "forward" in result and "train" not in result


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--compare-torch"])  # no --reference-repo
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--height", "100"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--modes", "forward,backward"])
    for bad in (["--layout", "foo"], ["--conv-impl", "bar"], ["--dtype", "float16x"],
                ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)
    args = benchmark.parse_args(["--layout", "NCHW", "--conv-impl", "shift"])
    assert (args.layout, args.conv_impl) == ("NCHW", "shift")


def test_does_not_import_tensorflow():
    code = ("import sys, drsformer_jax.benchmark, drsformer_jax.train; "
            "sys.exit(int('tensorflow' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- tools/gpu_benchmark.sh and tools/gpu_extras.py ---------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_benchmark.sh"


def _dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "release"], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env}, check=False)


def test_gpu_benchmark_budget_is_the_sum_of_its_timeouts():
    done = _dry_run(PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    line = next(s for s in done.stdout.splitlines() if s.startswith("budget:"))
    numbers = [int(n) for n in re.findall(r"(\d+) s", line)]
    *parts, kill, worst, budget = numbers
    assert worst == sum(parts) + 3 * kill and worst <= budget == 480
    assert f"python: {sys.executable} " in done.stdout  # the interpreter asked for
    assert "CUDA_VISIBLE_DEVICES=0" in done.stdout
    over = _dry_run(JAX_TIMEOUT="400")
    assert over.returncode == 2 and "over the budget" in over.stderr


def test_step_down_gives_each_try_fresh_donated_arguments():
    step = jax.jit(lambda state, x: state + x.sum(), donate_argnums=0)
    state = jnp.zeros(1024)
    step(state, jnp.ones(1))
    if not state.is_deleted():
        pytest.skip("this backend does not donate")
    with pytest.raises((RuntimeError, ValueError), match="deleted"):
        step(state, jnp.ones(1))  # what reusing a donated argument does

    tried = []

    def try_batch(batch: int) -> None:  # donates, then fails above 13 like an OOM would
        tried.append(batch)
        jax.block_until_ready(step(jnp.zeros(1024), jnp.ones(batch)))
        if batch > 13:
            raise MemoryError(f"RESOURCE_EXHAUSTED at batch {batch}")

    out = gpu_extras.step_down(try_batch, 16)
    assert tried == [16, 14, 13] and out["largest_fitting"] == 13
    assert [b for b, _ in out["failed_batches"]] == [16, 14]
    assert all("RESOURCE_EXHAUSTED" in why for _, why in out["failed_batches"])
    assert "largest_fitting" not in gpu_extras.step_down(try_batch, 40, tries=2)


def test_memory_check_refuses_what_cannot_fit():

    class Compiled:  # memory_analysis of a donated step: 10 temp, 4 out, 4 of it aliased
        def memory_analysis(self):
            return SimpleNamespace(temp_size_in_bytes=10 * 2**30, argument_size_in_bytes=4,
                                   output_size_in_bytes=4 * 2**30,
                                   alias_size_in_bytes=4 * 2**30)

    gib = 2**30
    gpu_extras.memory_check(lambda: (100 * gib, 20 * gib))(Compiled())  # 10 of 15 usable
    with pytest.raises(gpu_extras.DoesNotFitError) as e:
        gpu_extras.memory_check(lambda: (100 * gib, 14 * gib))(Compiled())
    assert e.value.memory["temp_bytes"] == 10 * gib


def test_batch_line_and_plan():
    line = gpu_extras.batch_line({8: 10 * 2**30, 16: 18 * 2**30}, 100 * 2**30)
    assert line["bytes_per_image"] == 2**30 and line["fixed_bytes"] == 2 * 2**30
    assert line["predicted"] == 93  # (95 - 2) GiB / 1 GiB
    for tiny in (True, False):
        runs = gpu_extras.plan(tiny)
        assert len({r.name for r in runs}) == len(runs) == 8
        assert runs[0].mode == runs[1].mode == "train" and runs[0].dtype == "float32"
    tiny_model = gpu_extras.build_model(True, "float32")
    assert (tiny_model.conv_impl, tiny_model.layout) == ("xla", "NHWC")  # the GPU's program

"""The benchmark CLI on a tiny configuration: fields and internal consistency only."""

import json
import subprocess
import sys

import pytest

from drsformer_jax import benchmark

TINY = ["--height", "16", "--width", "24", "--batch", "2", "--steps", "2", "--dim", "8",
        "--num-blocks", "1", "1", "1", "1", "--heads", "1", "1", "2", "2"]


def test_forward_and_train_step_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(TINY + ["--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    assert (result["height"], result["width"], result["batch"]) == (16, 24, 2)
    assert result["dtype"] == "float32" and result["model"]["dim"] == 8
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

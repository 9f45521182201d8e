"""Benchmark evaluation (main.py --mode evaluate) on a tiny synthetic set and a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from drsformer_jax import inference, score
from drsformer_jax.evaluation import evaluator as evaluate
from drsformer_jax.evaluation import metrics
from drsformer_jax.evaluation.scores import SCORE_FILE
from drsformer_jax.utils.images import read_rgb8

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), use_mefc=False)
SYNTHETIC = dict(num_train=1, num_test=3, height=16, width=16)


def _protocol(name: str, chosen: str = "") -> str:
    return evaluate.benchmark_protocol(ml_collections.ConfigDict(
        {"dataset": {"name": name, "benchmark_protocol": chosen}}))


def test_benchmark_protocols():
    assert {name: _protocol(name) for name in
            ("Rain200L", "Rain200H", "SPA-Data", "DID-Data", "DDN-Data", "synthetic",
             "Real")} == {
        "Rain200L": "matlab", "Rain200H": "matlab", "SPA-Data": "matlab",
        "DID-Data": "rcdnet", "DDN-Data": "rcdnet", "synthetic": "matlab",
        "Real": "niqe,brisque"}
    assert _protocol("MyRain") == "matlab"
    assert _protocol("MyRealRain", "niqe,brisque") == "niqe,brisque"
    assert set(evaluate.BENCHMARK_PROTOCOLS.values()) <= set(metrics.PROTOCOLS) | {
        "niqe,brisque"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, compilation_cache):
    """A tiny synthetic config, weights dir and training workdir; the worker's compilation
    cache (conftest.py), which derain's default folder points to: 16x16 compiles once."""
    from configs import synthetic
    from drsformer_jax.checkpoints import training as train_checkpoints
    from drsformer_jax.checkpoints.weights_dir import save_weights_dir
    from drsformer_jax.model.drsformer import DRSformer, init_params

    base = tmp_path_factory.mktemp("evaluate")
    config = synthetic.get_config()
    config.dataset.root = str(base / "data")
    config.dataset.synthetic.update(SYNTHETIC)
    config.update(TINY)
    model = DRSformer(**TINY)
    weights = base / "weights"
    save_weights_dir(weights, model.config(), init_params(model, 0))
    # A training workdir with two checkpoints of different weights.
    workdir = base / "workdir"
    manager = train_checkpoints.open_manager(workdir, async_save=False)
    for step, seed, psnr in ((1, 1, 30.0), (2, 2, 20.0)):
        train_checkpoints.save(manager, step, {"step": np.int32(step),
                                               "params": init_params(model, seed)},
                               {}, model.config(), metrics={"psnr": psnr})
    manager.wait_until_finished()
    manager.close()
    return dict(config=config, weights=weights, workdir=workdir, base=base,
                cache=compilation_cache)


@pytest.fixture(scope="module")
def weights_run(env):
    doc = evaluate.evaluate_checkpoint(env["config"], env["workdir"], env["weights"])
    return doc, env["workdir"] / "eval" / "synthetic"


def test_writes_pngs_and_score_json(weights_run, env):
    doc, out = weights_run
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert json.loads((out / SCORE_FILE).read_text()) == doc
    assert doc["protocol"] == "matlab" and sorted(doc["images"]) == \
        ["00000.png", "00001.png", "00002.png"]
    psnrs = [v["psnr"] for v in doc["images"].values()]
    assert doc["mean"]["psnr"] == pytest.approx(sum(psnrs) / 3)
    assert all(np.isfinite(psnrs)) and 0 < doc["mean"]["ssim"] < 1


def test_same_json_as_the_score_cli(weights_run, env, tmp_path, capsys):
    doc, out = weights_run
    targets = next((env["base"] / "data" / "synthetic").glob("*/test/synthetic/target"))
    assert score.main(["--results", str(out), "--targets", str(targets),
                       "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == doc
    # And the PNGs are the model's output, not the inputs: scored against the targets
    # they differ from what the rainy inputs score.
    rainy = read_rgb8(targets.parent / "input" / "00000.png")
    clean = read_rgb8(targets / "00000.png")
    assert metrics.evaluate(rainy, clean)["psnr"] != doc["images"]["00000.png"]["psnr"]


def test_workdir_uses_the_checkpoint_load_picks(env, tmp_path):
    from drsformer_jax.checkpoints.training import find_step_dir

    # checkpoint.load(workdir) picks the best step by PSNR, else the latest.
    picked = find_step_dir(env["workdir"])
    unpicked = env["workdir"] / "checkpoints" / ("1" if picked.name == "2" else "2")
    from_workdir = evaluate.evaluate_checkpoint(env["config"], env["workdir"],
                                                output_dir=tmp_path / "w")
    same = evaluate.evaluate_checkpoint(env["config"], env["workdir"], picked, tmp_path / "p")
    other = evaluate.evaluate_checkpoint(env["config"], env["workdir"], unpicked,
                                         tmp_path / "u")
    assert from_workdir == same and same != other
    assert (tmp_path / "w" / "00001.png").read_bytes() == \
        (tmp_path / "p" / "00001.png").read_bytes()


def test_refuses_to_write_into_the_data_set(env):
    pairs_input = next((env["base"] / "data" / "synthetic").glob("*/test/synthetic/input"))
    before = sorted(p.name for p in pairs_input.iterdir())
    with pytest.raises(evaluate.EvaluationError, match="input folder"):
        evaluate.evaluate_checkpoint(env["config"], env["workdir"], env["weights"], pairs_input)
    assert sorted(p.name for p in pairs_input.iterdir()) == before


def test_main_evaluate_mode(env, weights_run, tmp_path):
    """The command line, in a fresh process (the compiled program comes from the cache)."""
    overrides = [f"--config.dataset.root={env['config'].dataset.root}"] + [
        f"--config.dataset.synthetic.{k}={v}" for k, v in SYNTHETIC.items()]
    base = [sys.executable, "main.py", "--config", "configs/synthetic.py", *overrides,
            "--workdir", str(env["workdir"]), "--mode", "evaluate"]
    child_env = dict(os.environ, JAX_PLATFORMS="cpu", **{inference.CACHE_ENV: str(env["cache"])})
    run = subprocess.run([*base, "--checkpoint", str(env["weights"]), "--output",
                          str(tmp_path / "cli")], cwd=ROOT, env=child_env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    doc, _ = weights_run
    assert json.loads((tmp_path / "cli" / "score.json").read_text()) == doc
    assert f"PSNR {doc['mean']['psnr']:.4f} dB" in run.stdout

    bad = subprocess.run([*base, "--checkpoint", str(tmp_path / "missing")], cwd=ROOT,
                         env=child_env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "missing: no such checkpoint directory" in bad.stderr


def test_rcdnet_data_set_and_a_broken_pair(env, weights_run, tmp_path, capsys):
    """DID-Data is scored under RCDNet's protocol; a broken input fails alone, named."""
    import shutil

    from configs import did

    source = next((env["base"] / "data" / "synthetic").glob("*/test/synthetic"))
    root = tmp_path / "data"
    for kind in ("input", "target"):
        shutil.copytree(source / kind, root / "test" / "DID-Data" / kind)
    broken = root / "test" / "DID-Data" / "input" / "00001.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # the header survives: it fails when decoded
    config = did.get_config()
    config.dataset.root = str(root)
    config.update(TINY)
    out = tmp_path / "out"
    with pytest.raises(evaluate.EvaluationError, match="1 of 3 test images") as info:
        evaluate.evaluate_checkpoint(config, tmp_path / "workdir", env["weights"], out)
    assert "00001.png" in str(info.value)
    err = capsys.readouterr().err
    assert f"error: {broken}" in err and "Traceback" not in err
    # The other two are written and scored, under the rcdnet protocol.
    doc = json.loads((out / SCORE_FILE).read_text())
    assert doc["protocol"] == "rcdnet" and sorted(doc["images"]) == ["00000.png", "00002.png"]
    targets = root / "test" / "DID-Data" / "target"
    # 00001 has no result: score warns about it and scores the two pairs.
    assert score.main(["--results", str(out), "--targets", str(targets), "--protocol",
                       "rcdnet", "--json", str(tmp_path / "s.json")]) == 0
    scored = json.loads((tmp_path / "s.json").read_text())
    assert scored == doc
    # Same model, same images: the PNGs are those of the synthetic run; the figures differ.
    synthetic_doc, synthetic_out = weights_run
    assert (out / "00000.png").read_bytes() == (synthetic_out / "00000.png").read_bytes()
    assert doc["images"]["00000.png"] != synthetic_doc["images"]["00000.png"]


def test_real_rain_set_scores_inputs_and_outputs_without_targets(env, tmp_path, fixtures_dir):
    """A set of rainy photos only (input/, no target/): NIQE / BRISQUE of both, Table 2."""
    from drsformer_jax.evaluation import no_reference
    from drsformer_jax.utils.images import write_image

    photo = read_rgb8(fixtures_dir / "iqa" / "I19.png")
    inputs = tmp_path / "data" / "test" / "Real" / "input"
    crops = {"a.png": photo[:112, :120], "b.png": photo[100:212, 200:304]}
    for name, pixels in crops.items():
        write_image(inputs / name, pixels)
    config = ml_collections.ConfigDict(env["config"].to_dict())
    config.dataset.name, config.dataset.source = "Real", "folder"
    config.dataset.root = str(tmp_path / "data")
    doc = evaluate.evaluate_checkpoint(config, tmp_path / "work", env["weights"])
    out = tmp_path / "work" / "eval" / "Real"
    assert doc["protocol"] == "niqe,brisque" and sorted(doc["images"]) == ["a.png", "b.png"]
    assert json.loads((out / SCORE_FILE).read_text()) == doc
    for name, pixels in crops.items():
        figures = doc["images"][name]
        assert figures["input_niqe"] == no_reference.niqe(pixels)
        assert figures["input_brisque"] == no_reference.brisque(pixels)
        restored = read_rgb8(out / name)
        assert restored.shape == pixels.shape
        assert figures["niqe"] == no_reference.niqe(restored)
    assert set(doc["mean"]) == {"niqe", "brisque", "input_niqe", "input_brisque"}


def test_an_output_that_is_a_file_is_refused_before_any_work(env, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(evaluate.EvaluationError, match="--output .*taken: cannot write"):
        evaluate.evaluate_checkpoint(env["config"], tmp_path, tmp_path / "no_such_ckpt",
                                     tmp_path / "taken")

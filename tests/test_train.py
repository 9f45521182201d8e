"""End-to-end runs of main.py on a tiny model (the trainer's parts: test_trainer.py).

End-to-end runs go through subprocesses (so each can choose its device count) sharing
the worker's persistent compilation cache (conftest.py), so a program is compiled once.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A tiny DRSformer on a tiny synthetic set: seconds per step on 2 CPU cores.
TINY = [
    "--config.dim=8", "--config.num_blocks=(1,1,1,1)", "--config.heads=(1,1,1,1)",
    "--config.use_mefc=False", "--config.global_batch_size=4", "--config.crop_size=32",
    "--config.dataset.synthetic.num_train=12", "--config.dataset.synthetic.num_test=2",
    "--config.dataset.synthetic.height=40", "--config.dataset.synthetic.width=44",
    "--config.log_every_steps=3", "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=4", "--config.cpu_devices=1",
]


# --- end-to-end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(compilation_cache):
    e = dict(os.environ)  # with the worker's compilation cache (conftest.py)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def run_main(workdir, data_root, env, *extra, devices=1, check=True, timeout=900):
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/synthetic.py"),
           "--workdir", str(workdir), f"--config.dataset.root={data_root}", *TINY,
           f"--config.cpu_devices={devices}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text()
            .splitlines()]


def at(workdir, step, key):
    values = [r[key] for r in records(workdir) if r["step"] == step and key in r]
    assert len(values) == 1, (step, key, records(workdir))
    return values[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root, env):
    workdir = tmp_path_factory.mktemp("straight")
    run_main(workdir, data_root, env, "--config.num_train_steps=8")
    return workdir


def test_metrics_jsonl_has_training_and_evaluation_records(straight):
    recs = records(straight)
    train_steps = [r["step"] for r in recs if "train_loss" in r]
    assert train_steps == [3, 6, 8]
    for r in recs:
        if "train_loss" in r:
            assert {"learning_rate", "grad_norm", "steps_per_sec", "images_per_sec"} <= set(r)
            assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
    evals = [r for r in recs if "psnr" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert {"ssim", "input_psnr"} <= set(r) and 0 < r["input_psnr"] < 40
    assert (straight / "before_after.png").is_file()
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_is_exact(tmp_path, straight, data_root, env):
    run_main(tmp_path, data_root, env, "--config.num_train_steps=5")  # stops mid log window
    run_main(tmp_path, data_root, env, "--config.num_train_steps=8")
    for key in ("train_loss", "grad_norm", "psnr", "ssim"):
        assert at(tmp_path, 8, key) == pytest.approx(at(straight, 8, key), rel=1e-6), key
    # The resumed run logged each step once.
    steps = [r["step"] for r in records(tmp_path) if "train_loss" in r]
    assert steps == [3, 5, 6, 8]


def test_four_devices_match_one(tmp_path, data_root, env):
    """What 1 vs N devices promises: the same global batches, one all-reduce of the
    gradients, so step 1 agrees to rounding; Adam then amplifies last-bit differences
    (normal for data parallelism), so later steps agree only loosely."""
    flags = ["--config.num_train_steps=20", "--config.log_every_steps=1",
             "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20"]
    one, four = tmp_path / "one", tmp_path / "four"
    assert "1 device(s)" in run_main(one, data_root, env, *flags).stdout
    assert "4 device(s)" in run_main(four, data_root, env, *flags, devices=4).stdout
    assert at(four, 1, "train_loss") == pytest.approx(at(one, 1, "train_loss"), rel=1e-6)
    assert at(four, 1, "grad_norm") == pytest.approx(at(one, 1, "grad_norm"), rel=1e-5)
    assert at(four, 20, "train_loss") == pytest.approx(at(one, 20, "train_loss"), rel=0.02)


def test_checkpoints_load_for_inference_and_export(straight, tmp_path):
    import drsformer_jax
    from drsformer_jax import convert, derain

    model, variables = drsformer_jax.load(straight)
    assert model.config()["dim"] == 8
    y = jax.jit(model.apply)(variables, jnp.zeros((1, 16, 16, 3)))
    assert y.shape == (1, 16, 16, 3)
    assert convert.main(["--to-torch", "--checkpoint", str(straight),
                         "--output", str(tmp_path / "trained.pth")]) == 0
    assert (tmp_path / "trained.pth").stat().st_size > 10_000
    from drsformer_jax.utils.images import write_image

    write_image(tmp_path / "in" / "a.png", np.full((13, 17, 3), 120, np.uint8))
    assert derain.main(["--checkpoint", str(straight), "--input", str(tmp_path / "in"),
                        "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "a.png").is_file()


def test_bad_dataset_layout_is_one_clear_error(tmp_path, env):
    (tmp_path / "data" / "train" / "Rain200H" / "input").mkdir(parents=True)
    e = dict(env)
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/rain200h.py"),
           "--workdir", str(tmp_path / "w"), f"--config.dataset.root={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "target" in last and "Rain200H" in last


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, env):
    proc = run_main(tmp_path, data_root, env, "--config.num_train_steps=40",
                    "--config.learning_rate=1e30", "--config.checkpoint_every_steps=1",
                    "--config.eval_every_steps=100", "--config.log_every_steps=1", check=False)
    assert proc.returncode != 0
    assert "train_loss became" in proc.stderr and "Traceback" not in proc.stderr
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept, "a good checkpoint must remain"
    assert all(math.isfinite(r["train_loss"]) for r in records(tmp_path) if "train_loss" in r)


def test_sigterm_saves_and_the_run_resumes(tmp_path, data_root, env):
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/synthetic.py"),
           "--workdir", str(tmp_path), f"--config.dataset.root={data_root}", *TINY,
           "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
           "--config.eval_every_steps=100000", "--config.log_every_steps=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "saved a checkpoint at step" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 1
    import drsformer_jax

    drsformer_jax.load(tmp_path)  # the checkpoint is complete and loadable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(cmd, env, timeout):
    """Runs `cmd` as processes 0 and 1 of a jax.distributed job (2 CPU devices each, gloo);
    returns the processes and their (stdout, stderr)."""
    port = free_port()
    procs = []
    for pid in range(2):
        e = dict(env, XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(pid), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        procs.append(subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs, [p.communicate(timeout=timeout) for p in procs]


def test_two_processes_with_jax_distributed_match_one(tmp_path, straight, data_root, env):
    cmd = [sys.executable, str(ROOT / "main.py"), "--distributed",
           "--config", str(ROOT / "configs/synthetic.py"), "--workdir", str(tmp_path),
           f"--config.dataset.root={data_root}", *TINY, "--config.cpu_devices=2",
           "--config.num_train_steps=8"]
    procs, outs = two_processes(cmd, env, timeout=900)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "4 device(s) on 2 host(s)" in outs[0][0]
    # Same global batches; one all-reduce over 4 devices: Adam amplifies the last bits.
    assert at(tmp_path, 8, "train_loss") == pytest.approx(at(straight, 8, "train_loss"),
                                                          rel=0.02)


def _error_line(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_resuming_with_another_architecture_names_the_fields(straight, data_root, env):
    proc = run_main(straight, data_root, env, "--config.num_train_steps=8", "--config.dim=16",
                    "--config.use_mefc=True", check=False)
    line = _error_line(proc)
    assert line.startswith("error:") and "was trained with dim=8, use_mefc=False" in line
    assert "--config.dim=8 --config.use_mefc=False" in line


def test_config_is_checked_before_anything_is_written(tmp_path, data_root, env):
    for flag, words in [("--config.log_every_steps=0", "log_every_steps must be > 0"),
                        ("--config.num_train_steps=-1", "num_train_steps must be >= 0"),
                        ("--config.nope=1", "no such config field")]:
        proc = run_main(tmp_path / "w", data_root, env, flag, check=False)
        assert words in _error_line(proc)
        assert not (tmp_path / "w").exists()
    (tmp_path / "file").write_text("x")
    proc = run_main(tmp_path / "file", data_root, env, check=False)
    assert "--workdir" in _error_line(proc) and "cannot write there" in _error_line(proc)


def test_a_second_training_in_one_workdir_is_refused(tmp_path, data_root, env):
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/synthetic.py"),
           "--workdir", str(tmp_path), f"--config.dataset.root={data_root}", *TINY,
           "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
           "--config.eval_every_steps=100000"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        lock, deadline = tmp_path / ".lock", time.time() + 300
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.2)
        second = run_main(tmp_path, data_root, env, check=False)
        line = _error_line(second)
        assert f"is in use by pid {first.pid}" in line and "another --workdir" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    # SIGTERM during setup ends it at once (-15), during training with a save (143):
    assert first.returncode in (143, -signal.SIGTERM)
    assert (tmp_path / ".lock").exists()  # the lock does not outlive its holder:
    from drsformer_jax.utils.files import FolderLock

    FolderLock(tmp_path).acquire().release()


def test_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, straight, data_root, env):
    import drsformer_jax

    work = tmp_path / "w"
    shutil.copytree(straight, work)
    damaged = work / "checkpoints" / "8"
    for f in (damaged / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])  # truncate every data file of step 8
    drsformer_jax.load(work / "checkpoints" / "4")
    with pytest.raises(ValueError, match="cannot restore"):
        drsformer_jax.load(damaged)
    # derain (as --mode evaluate, through drsformer_jax.load) on another copy: one note
    # naming where the damaged step went, and no traceback on the way.
    other = tmp_path / "other"
    shutil.copytree(work, other)
    from drsformer_jax.utils.images import write_image

    write_image(tmp_path / "in" / "a.png", np.full((13, 17, 3), 120, np.uint8))
    derain = subprocess.run(
        [sys.executable, "-m", "drsformer_jax.derain", "--checkpoint", str(other), "--input",
         str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert derain.returncode == 0, derain.stderr[-3000:]
    assert "Traceback" not in derain.stderr, derain.stderr[-3000:]
    [aside] = list((other / "damaged_checkpoints").iterdir())
    notes = [line for line in derain.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes
    assert notes[0].startswith(f"note: {other / 'checkpoints' / '8'}: cannot restore (")
    assert notes[0].endswith(f"; moved it to {aside}; using {other / 'checkpoints' / '4'} instead")

    proc = run_main(work, data_root, env, "--config.num_train_steps=8")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    [aside] = list((work / "damaged_checkpoints").iterdir())
    assert len(notes) == 1 and notes[0].startswith(f"note: {damaged}: cannot restore ("), notes
    assert notes[0].endswith(f"; moved it to {aside}; resuming from {work / 'checkpoints' / '4'}")
    assert "resumed from" in proc.stdout and str(work / "checkpoints" / "4") in proc.stdout
    assert aside.name.split("-")[0] == "8"
    steps = [r["step"] for r in records(work) if "train_loss" in r]
    assert steps == sorted(set(steps)) == [3, 6, 8]  # each step once
    assert at(work, 8, "train_loss") == pytest.approx(at(straight, 8, "train_loss"), rel=1e-6)


def test_fine_tuning_starts_from_a_release_pth(tmp_path, straight, data_root, env):
    """init_from a .pth: step-0 evaluation is the source model's own score; the loss starts
    where the source model left it. Stale lines of an earlier run are dropped."""
    from drsformer_jax import convert

    source = straight / "checkpoints" / "8"
    assert convert.main(["--to-torch", "--checkpoint", str(source),
                         "--output", str(tmp_path / "src.pth")]) == 0
    work = tmp_path / "ft"
    work.mkdir()
    (work / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9}\n{"step": 2, "trai')
    proc = run_main(work, data_root, env, "--config.num_train_steps=3",
                    f"--config.init_from={tmp_path / 'src.pth'}")
    assert "dropped 1 incomplete line" in proc.stderr
    assert at(work, 0, "psnr") == at(straight, 8, "psnr")  # the weights were used
    assert at(work, 3, "train_loss") < 0.8 * at(straight, 3, "train_loss")
    assert [r["step"] for r in records(work) if "train_loss" in r] == [3]
    info = json.loads((work / "config.json").read_text())
    assert info["started_from"] == str(tmp_path / "src.pth")
    # Resuming wins over init_from, with a note; another architecture is refused.
    again = run_main(work, data_root, env, "--config.num_train_steps=3",
                     f"--config.init_from={tmp_path / 'src.pth'}")
    assert "init_from" in again.stdout and "was not used" in again.stdout
    other = run_main(tmp_path / "ft2", data_root, env, "--config.num_train_steps=3",
                     "--config.use_mefc=True", f"--config.init_from={tmp_path / 'src.pth'}",
                     check=False)
    assert "use_mefc=False" in _error_line(other) and "--config.use_mefc=False" in (
        _error_line(other))


# One pair of processes checks every kind of init_from source: what main.py does before
# its first step (setup, restore_or_init, the step-0 evaluation), without compiling
# the train step. Arguments: data root, base workdir, TINY flags, [[name, source], ...].
_INIT_FROM_WORKER = r"""
import ast, json, os, sys, zlib
import jax
import numpy as np
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                           int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
from configs import synthetic
from drsformer_jax.train.loop import TrainingRun

data_root, base, flags, sources = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
config = synthetic.get_config()
config.dataset.root, config.num_train_steps = data_root, 1
for flag in flags:
    *path, last = flag.removeprefix("--config.").split("=")[0].split(".")
    node = config
    for key in path:
        node = node[key]
    node[last] = ast.literal_eval(flag.split("=", 1)[1])
out = {}
for name, source in sources:
    config.init_from = source
    training = TrainingRun(config, os.path.join(base, name))
    try:
        training.setup()
        state = training.restore_or_init()
        crc = 0
        for leaf in jax.tree_util.tree_leaves(state.params):
            first, *others = [np.asarray(shard.data) for shard in leaf.addressable_shards]
            assert all(np.array_equal(first, x) for x in others)  # every local copy
            crc = zlib.crc32(first.reshape(-1).view(np.uint8), crc)
        out[name] = {"crc": crc}
        if name == "workdir":  # the step-0 evaluation main.py runs (seconds of tracing)
            out[name]["psnr"] = training._evaluate(0, state)["psnr"]
    finally:
        training.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_two_processes_fine_tune_from_every_kind_of_source(tmp_path, straight, data_root, env):
    """init_from a workdir, a step directory, a weights directory and a .pth on two
    processes: both start from the source's own parameters (every local copy, the same
    CRC32), and the step-0 evaluation of the workdir case is the source's own score."""
    from drsformer_jax import convert

    pth, weights = tmp_path / "src.pth", tmp_path / "weights"
    assert convert.main(["--to-torch", "--checkpoint", str(straight), "--output", str(pth)]) == 0
    assert convert.main(["--torch-checkpoint", str(pth), "--output", str(weights)]) == 0
    sources = [["workdir", str(straight)], ["step", str(straight / "checkpoints" / "4")],
               ["weights", str(weights)], ["pth", str(pth)]]
    cmd = [sys.executable, "-c", _INIT_FROM_WORKER, str(data_root), str(tmp_path / "runs"),
           json.dumps(TINY), json.dumps(sources)]
    procs, outs = two_processes(cmd, env, timeout=600)
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    from drsformer_jax.checkpoints.loading import load_params

    for name, source in sources:  # both processes start from the source's own parameters
        crc = 0
        for leaf in jax.tree_util.tree_leaves(load_params(source)[1]):
            crc = zlib.crc32(np.asarray(leaf).reshape(-1).view(np.uint8), crc)
        assert results[0][name]["crc"] == results[1][name]["crc"] == crc, name
    for r in results:  # and score what the source scored (its best step, 8)
        assert r["workdir"]["psnr"] == pytest.approx(at(straight, 8, "psnr"), abs=1e-4)


# Reads a failed restore leaves behind: one read fails at once, the others are still in
# flight when the event loop closes, as in orbax's restore of a partly damaged checkpoint.
_ABANDONED_READS = r"""
import asyncio, sys
import numpy as np
import tensorstore as ts
if sys.argv[2] == "silenced":
    from drsformer_jax.checkpoints import training
    training._silence_abandoned_reads()
spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": sys.argv[1]}}
array = ts.open(spec, create=True, dtype=ts.float32, shape=[32, 256, 1024],
                chunk_layout=ts.ChunkLayout(chunk_shape=[1, 256, 1024])).result()
array.write(np.ones((32, 256, 1024), np.float32)).result()

async def restore():
    async def damaged():
        raise ValueError("damaged")
    async def read(future):
        return await future
    await asyncio.gather(damaged(), *[read(array[i].read()) for i in range(32)])

loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(restore())
except ValueError:
    pass
finally:
    loop.close()
import time
time.sleep(1)  # the abandoned reads complete now, into the closed loop
print("done")
"""


def test_abandoned_reads_of_a_failed_restore_print_no_traceback(tmp_path, env):
    def run(mode):
        return subprocess.run([sys.executable, "-c", _ABANDONED_READS, str(tmp_path / mode),
                               mode], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    loud, quiet = run("loud"), run("silenced")
    assert "Event loop is closed" in loud.stderr  # what a fallback printed, ~58 times
    assert quiet.returncode == 0 and quiet.stdout.strip() == "done"
    assert "Traceback" not in quiet.stderr, quiet.stderr[-2000:]

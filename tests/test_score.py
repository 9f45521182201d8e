"""The score CLI end to end on small temporary folders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drsformer_jax import score
from drsformer_jax.evaluation import metrics, scores
from drsformer_jax.utils.files import first_names
from drsformer_jax.utils.images import write_image

H, W = 24, 32


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    i = np.arange(h)[:, None, None]
    j = np.arange(w)[None, :, None]
    c = np.arange(3)[None, None, :]
    return ((i * (7 + seed) + j * (3 + 2 * seed) + c * 50 + seed * 11) % 256).astype(np.uint8)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    results, targets = tmp_path / "results", tmp_path / "targets"
    results.mkdir()
    targets.mkdir()
    write_image(results / "a.png", _image(1))
    write_image(targets / "a.png", _image(2))
    write_image(results / "b.png", _image(3))
    Image.fromarray(_image(4)).save(targets / "b.bmp")  # pairs by stem
    write_image(results / "only_result.png", _image(5))
    write_image(targets / "only_target.png", _image(6))
    (results / "notes.txt").write_text("not an image")
    return results, targets


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = score.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_pairs_by_name_then_stem_and_writes_json(folders, tmp_path, capsys):
    results, targets = folders
    out_json = tmp_path / "out" / "scores.json"
    # --json into a folder that does not exist is an error, not a silently made tree.
    assert score.main(["--results", str(results), "--targets", str(targets),
                       "--json", str(out_json)]) == 2
    assert not out_json.parent.exists()
    out_json.parent.mkdir()
    code, out, err = _run(capsys, "--results", results, "--targets", targets,
                          "--json", out_json)
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert list(doc) == ["protocol", "mean", "images"]
    assert doc["protocol"] == "matlab"
    assert set(doc["images"]) == {"a.png", "b.png"}
    expected = {
        "a.png": metrics.evaluate(_image(1), _image(2), "matlab"),
        "b.png": metrics.evaluate(_image(3), _image(4), "matlab"),
    }
    assert doc["images"] == expected  # exact: JSON floats round-trip
    for key in ("psnr", "ssim"):
        assert doc["mean"][key] == pytest.approx(
            (expected["a.png"][key] + expected["b.png"][key]) / 2, rel=1e-15)
    assert f"a.png  PSNR {expected['a.png']['psnr']:.4f} dB" in out
    assert f"mean of 2 image(s) (matlab protocol): PSNR {doc['mean']['psnr']:.4f}" in out
    assert "1 result file(s)" in err and "only_result.png" in err
    assert "1 target file(s)" in err and "only_target.png" in err
    assert "notes.txt" not in err
    assert [p.name for p in out_json.parent.iterdir()] == ["scores.json"]  # no temp left


def test_protocol_flag_changes_the_figures(folders, tmp_path, capsys):
    results, targets = folders
    out_json = tmp_path / "rcdnet.json"
    code, _, _ = _run(capsys, "--results", results, "--targets", targets,
                      "--protocol", "rcdnet", "--json", out_json)
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert doc["protocol"] == "rcdnet"
    assert doc["images"]["a.png"] == metrics.evaluate(_image(1), _image(2), "rcdnet")
    assert doc["images"]["a.png"] != metrics.evaluate(_image(1), _image(2), "matlab")


def test_identical_pair_gives_inf_like_the_scripts(tmp_path, capsys):
    results, targets = tmp_path / "r", tmp_path / "t"
    for d in (results, targets):
        d.mkdir()
        write_image(d / "1.png", _image(7))
    out_json = tmp_path / "s.json"
    code, out, _ = _run(capsys, "--results", results, "--targets", targets, "--json", out_json)
    assert code == 0
    assert "Infinity" in out_json.read_text()
    doc = json.loads(out_json.read_text())
    assert doc["mean"]["psnr"] == math.inf and doc["images"]["1.png"]["ssim"] == 1.0
    assert "PSNR inf dB" in out


def test_broken_and_mismatched_files_are_named_skipped_and_fail_at_the_end(
        folders, tmp_path, capsys):
    results, targets = folders
    (results / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(targets / "broken.png", _image(8))
    write_image(results / "small.png", _image(9, H, W - 1))
    write_image(targets / "small.png", _image(9))
    out_json = tmp_path / "partial.json"
    code, _, err = _run(capsys, "--results", results, "--targets", targets,
                        "--json", out_json)
    assert code == 1
    lines = err.splitlines()
    assert any(line.startswith("error: ") and "broken.png" in line for line in lines)
    assert any("small.png" in line and "31x24" in line and "32x24" in line for line in lines)
    assert "2 of 4 pair(s) could not be scored" in err
    assert "Traceback" not in err
    assert set(json.loads(out_json.read_text())["images"]) == {"a.png", "b.png"}


def test_too_small_for_ssim_is_a_per_image_error(tmp_path, capsys):
    results, targets = tmp_path / "r", tmp_path / "t"
    for d, seed in ((results, 1), (targets, 2)):
        d.mkdir()
        write_image(d / "tiny.png", _image(seed, 8, 8))
        write_image(d / "ok.png", _image(seed))
    code, out, err = _run(capsys, "--results", results, "--targets", targets)
    assert code == 1
    assert "tiny.png" in err and "11x11" in err
    assert "mean of 1 image(s)" in out
    code, _, _ = _run(capsys, "--results", results, "--targets", targets,
                      "--protocol", "basicsr")
    assert code == 0


def test_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    code, out, err = _run(capsys, "--results", tmp_path / "nope", "--targets", tmp_path / "t")
    assert code == 2
    assert err.strip() == f"error: results folder not found: {tmp_path / 'nope'}"
    assert out == ""


def test_no_pairs_is_fatal(tmp_path, capsys):
    results, targets = tmp_path / "r", tmp_path / "t"
    results.mkdir()
    targets.mkdir()
    write_image(results / "x.png", _image(1))
    write_image(targets / "y.png", _image(1))
    code, _, err = _run(capsys, "--results", results, "--targets", targets)
    assert code == 2
    assert err.splitlines()[-1].startswith("error: no image pairs")


def test_unpaired_report_lists_first_names_and_a_count():
    results = [Path(f"r/{i}.png") for i in range(8)]
    targets = [Path("t/0.png"), Path("t/x.jpg"), Path("t/x.bmp")]
    pairing = scores.pair_files(results + [Path("r/x.png")], targets)
    assert [(r.name, t.name) for r, t in pairing.pairs] == [("0.png", "0.png")]
    # x.png matches two targets by stem: ambiguous, so nothing is guessed.
    assert pairing.unpaired_results == ["1.png", "2.png", "3.png", "4.png", "5.png",
                                         "6.png", "7.png", "x.png"]
    assert pairing.unpaired_targets == ["x.bmp", "x.jpg"]
    assert first_names(pairing.unpaired_results) == \
        "1.png, 2.png, 3.png, 4.png, 5.png, and 3 more"


def test_cli_as_a_module_without_traceback(folders, tmp_path):
    results, targets = folders
    (results / "b.png").write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "drsformer_jax.score", "--results", str(results),
         "--targets", str(targets), "--json", str(tmp_path / "j.json")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert any("b.png" in line and line.startswith("error: ")
               for line in proc.stderr.splitlines())
    assert "mean of 1 image(s)" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "drsformer_jax.score", "--results", str(results),
         "--targets", str(targets), "--protocol", "nope"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    assert bad.returncode == 2 and "unknown protocol nope" in bad.stderr


def test_no_reference_metrics_need_no_targets(tmp_path, capsys, fixtures_dir):
    """--protocol niqe,brisque scores the results alone; bad files are named, others scored."""
    from drsformer_jax.evaluation import no_reference
    from drsformer_jax.utils.images import read_rgb8

    results = tmp_path / "real"
    results.mkdir()
    source = read_rgb8(fixtures_dir / "iqa" / "I04.png")
    write_image(results / "a.png", source)
    write_image(results / "gray.png", source.mean(axis=2).astype(np.uint8)[:, :, None])
    write_image(results / "tiny.png", source[:64, :64])  # below NIQE's 96x96 block
    (results / "broken.png").write_bytes(b"not a png")
    out_json = tmp_path / "score.json"
    code, out, err = _run(capsys, "--results", results, "--protocol", "niqe,brisque",
                          "--json", out_json)
    assert code == 1
    assert "broken.png" in err and "tiny.png" in err and "96x96" in err
    assert "2 of 4 image(s) could not be scored" in err
    doc = json.loads(out_json.read_text())
    assert doc["protocol"] == "niqe,brisque" and set(doc["images"]) == {"a.png", "gray.png"}
    assert doc["images"]["a.png"] == {"niqe": no_reference.niqe(source),
                                      "brisque": no_reference.brisque(source)}
    mean = (doc["images"]["a.png"]["niqe"] + doc["images"]["gray.png"]["niqe"]) / 2
    assert doc["mean"]["niqe"] == pytest.approx(mean)
    assert "NIQE" in out and "BRISQUE" in out


def test_full_reference_protocols_need_targets(tmp_path, capsys):
    results = tmp_path / "r"
    write_image(results / "a.png", _image(1))
    code, _, err = _run(capsys, "--results", results, "--protocol", "matlab")
    assert code == 2 and "--targets is needed" in err
    with pytest.raises(SystemExit) as bad:  # a bad flag: argparse's exit status 2
        score.main(["--results", str(results), "--protocol", "matlab,rcdnet"])
    assert bad.value.code == 2 and "at most one of" in capsys.readouterr().err

"""Produces tests/fixtures/metrics/reference.json: the release's own metric code run
on deterministic images, for tests/test_metrics.py to compare drsformer_jax.metrics to.

    python tools/make_metric_vectors.py --reference-repo PATH/TO/DRSformer [--basicsr]

Needs GNU Octave with the image package (Debian: octave octave-image). The release's
scripts are run unmodified from PATH (nothing of them is copied here):

- "matlab": evaluate_PSNR_SSIM.m itself, on a scratch folder holding one pair at a
  time. Octave only allows a script's local functions to be defined before their
  use, so the script's text is split into a script plus one file per function.
- "rcdnet": the release's psnr.m and ssim.m, called the way statistic.m calls them
  (statistic.m itself hard-codes Windows paths and 1,200 images).
- "basicsr" (with --basicsr; needs opencv-python): calculate_psnr/calculate_ssim of
  basicsr/metrics/psnr_ssim.py with test_y_channel=True, crop_border=0, on BGR uint8
  images as the release's validation passes them. torch and skimage are imported
  there but unused on this path, so they are stubbed when absent.

It also records Octave's rgb2ycbcr on all 194 colours whose Y is an exact .5 tie and
on a sample of other colours. With --samples it prints the figures of the release's
sample images (evaluations/*/results) for comparison; they are not stored.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drsformer_jax.evaluation import metrics  # noqa: E402
from drsformer_jax.utils.images import read_rgb8  # noqa: E402

MATLAB_DIR = "evaluations/Evalution_Rain200L_Rain200H_SPA-Data"
RCDNET_DIR = "evaluations/Evaluation_DID-Data_DDN-Data"
OUT = REPO / "tests/fixtures/metrics/reference.json"


def load_synthetic() -> types.ModuleType:
    path = REPO / "tests/fixtures/metrics/synthetic.py"
    spec = importlib.util.spec_from_file_location("metric_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_octave(octave: str, code: str, cwd: Path) -> str:
    proc = subprocess.run([octave, "--no-gui", "--quiet", "--norc", "--eval", code],
                          cwd=cwd, capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr


def parse_ref(output: str) -> tuple[float, float] | str:
    """'REF psnr ssim' line of our wrappers, or the error Octave printed."""
    m = re.search(r"^REF (\S+) (\S+)$", output, re.M)
    if m:
        return _octave_float(m.group(1)), _octave_float(m.group(2))
    err = re.search(r"^error: (.*)$", output, re.M)
    return err.group(1) if err else output.strip()


def _octave_float(text: str) -> float:
    return float(text.replace("Inf", "inf").replace("NaN", "nan"))


def split_script(script: Path, dest: Path) -> None:
    """Writes the script part of evaluate_PSNR_SSIM.m and each of its functions."""
    text = script.read_text(encoding="latin-1")
    parts = re.split(r"(?m)^(?=function\b)", text)
    (dest / "main_script.m").write_text(parts[0], encoding="latin-1")
    for part in parts[1:]:
        name = re.match(r"function\s+(?:\[[^\]]*\]|\w+)\s*=\s*(\w+)", part).group(1)
        (dest / f"{name}.m").write_text(part, encoding="latin-1")


def matlab_protocol(octave: str, ref: Path, pairs: dict[str, tuple[Path, Path]],
                    work: Path) -> dict[str, tuple[float, float] | str]:
    out = {}
    for name, (res, tgt) in pairs.items():
        d = work / f"matlab-{len(out)}"
        (d / "results/Rain200L").mkdir(parents=True)
        (d / "Datasets/Rain200L/targets").mkdir(parents=True)
        split_script(ref / MATLAB_DIR / "evaluate_PSNR_SSIM.m", d)
        shutil.copy(res, d / "results/Rain200L" / ("1" + res.suffix))
        shutil.copy(tgt, d / "Datasets/Rain200L/targets" / ("1" + tgt.suffix))
        out[name] = parse_ref(run_octave(
            octave, "pkg load image; source('main_script.m');"
            " printf('REF %.17g %.17g\\n', qm_psnr, qm_ssim);", d))
    return out


RCDNET_WRAPPER = """function rcdnet_pair(result_png, target_png)
  % The per-image steps of statistic.m.
  x_true = rgb2ycbcr(im2double(imread(target_png)));
  x_true = x_true(:, :, 1);
  x = rgb2ycbcr(im2double(imread(result_png)));
  x = x(:, :, 1);
  p = psnr(x, x_true);
  s = ssim(x * 255, x_true * 255);
  printf('REF %.17g %.17g\\n', p, s);
end
"""


def rcdnet_protocol(octave: str, ref: Path, pairs: dict[str, tuple[Path, Path]],
                    work: Path) -> dict[str, tuple[float, float] | str]:
    d = work / "rcdnet"
    d.mkdir()
    (d / "rcdnet_pair.m").write_text(RCDNET_WRAPPER)
    out = {}
    for name, (res, tgt) in pairs.items():
        # addpath last, so that the release's psnr.m / ssim.m shadow the image package's.
        code = (f"pkg load image; addpath('{ref / RCDNET_DIR}');"
                f" rcdnet_pair('{res}', '{tgt}');")
        out[name] = parse_ref(run_octave(octave, code, d))
    return out


def basicsr_protocol(ref: Path, pairs: dict[str, tuple[Path, Path]]) -> dict:
    import cv2  # noqa: F401  (fail early and clearly when OpenCV is missing)

    for top in ("torch", "skimage"):
        if top not in sys.modules and importlib.util.find_spec(top) is None:
            sys.modules[top] = types.ModuleType(top)
            if top == "skimage":  # psnr_ssim.py does `import skimage.metrics`
                sys.modules["skimage.metrics"] = sys.modules[top].metrics = \
                    types.ModuleType("skimage.metrics")
    # Namespace stubs keep basicsr/__init__.py and basicsr/utils/__init__.py (which
    # import the whole training stack) from running; only the metric files load.
    for package in ("basicsr", "basicsr.metrics", "basicsr.utils"):
        module = types.ModuleType(package)
        module.__path__ = [str(ref / package.replace(".", "/"))]
        sys.modules[package] = module
    spec = importlib.util.spec_from_file_location(
        "basicsr.metrics.psnr_ssim", ref / "basicsr/metrics/psnr_ssim.py")
    psnr_ssim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(psnr_ssim)
    out = {}
    for name, (res, tgt) in pairs.items():
        a = read_rgb8(res)[..., ::-1].copy()  # BGR, as the release's validation has it
        b = read_rgb8(tgt)[..., ::-1].copy()
        out[name] = (float(psnr_ssim.calculate_psnr(a, b, 0, test_y_channel=True)),
                     float(psnr_ssim.calculate_ssim(a, b, 0, test_y_channel=True)))
    return out


def tie_colours() -> np.ndarray:
    """All RGB colours whose exact Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
    ends in .5, where rounding depends on floating-point details."""
    c = np.arange(256, dtype=np.int64)
    s = 65481 * c[:, None, None] + 128553 * c[None, :, None] + 24966 * c[None, None, :]
    return np.argwhere(s % 255000 == 127500).astype(np.uint8)


def sample_colours(n: int = 1024) -> np.ndarray:
    k = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(12345)) \
        % np.uint64(1 << 24)
    return np.stack([k >> np.uint64(16), (k >> np.uint64(8)) & np.uint64(255),
                     k & np.uint64(255)], axis=1).astype(np.uint8)


def octave_y(octave: str, colours: np.ndarray, work: Path) -> tuple[list[int], list[float]]:
    img = work / "colours.png"
    Image.fromarray(colours[None]).save(img)
    code = ("pkg load image; c = imread('colours.png'); y8 = rgb2ycbcr(c);"
            " yd = rgb2ycbcr(im2double(c)); printf('Y8 %d\\n', y8(:, :, 1));"
            " printf('YD %.17g\\n', yd(:, :, 1));")
    out = run_octave(octave, code, work)
    y8 = [int(v) for v in re.findall(r"^Y8 (\S+)$", out, re.M)]
    yd = [float(v) for v in re.findall(r"^YD (\S+)$", out, re.M)]
    if len(y8) != len(colours) or len(yd) != len(colours):
        raise SystemExit(f"octave rgb2ycbcr failed:\n{out}")
    return y8, yd


def figures(value: tuple[float, float] | str) -> dict:
    if isinstance(value, str):
        return {"error": value}
    return {"psnr": value[0], "ssim": value[1]}


def release_samples(octave: str, ref: Path, work: Path, basicsr: bool) -> None:
    """Prints the release's sample pairs under every protocol, reference vs ours.

    Each protocol is run on all the samples (not only on the data sets it is used for)
    to cover both 481x321 and 512x512 images.
    """
    pairs: dict[str, tuple[Path, Path]] = {}
    base = ref / MATLAB_DIR
    for dataset in ("Rain200L", "Rain200H", "SPA-Data"):
        for res in sorted((base / "results" / dataset).glob("*.png")):
            pairs[f"{dataset}/{res.name}"] = (
                res, base / "Datasets" / dataset / "targets" / res.name)
    for res in sorted((ref / RCDNET_DIR / "results").glob("*_DR.png")):
        pairs[f"DID-DDN/{res.name}"] = (res, res.with_name(res.name.replace("_DR", "_GT")))
    work = work / "samples"
    work.mkdir()
    found = {"matlab": matlab_protocol(octave, ref, pairs, work),
             "rcdnet": rcdnet_protocol(octave, ref, pairs, work)}
    if basicsr:
        found["basicsr"] = basicsr_protocol(ref, pairs)
    for protocol, figures_by_name in found.items():
        worst = [0.0, 0.0]
        for name, (res, tgt) in pairs.items():
            ours = metrics.evaluate(read_rgb8(res), read_rgb8(tgt), protocol)
            p, s = figures_by_name[name]
            dp, ds = ours["psnr"] - p, ours["ssim"] - s
            worst = [max(worst[0], abs(dp)), max(worst[1], abs(ds))]
            print(f"{protocol:7s} {name:18s} reference {p:.10f} {s:.10f}  ours "
                  f"{ours['psnr']:.10f} {ours['ssim']:.10f}  dpsnr {dp:+.2e} dssim {ds:+.2e}")
        print(f"{protocol:7s} max |dpsnr| {worst[0]:.2e} dB, max |dssim| {worst[1]:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", type=Path, required=True,
                        help="checkout of the official DRSformer release")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--octave", default="octave-cli")
    parser.add_argument("--basicsr", action="store_true",
                        help="also run basicsr's Python metrics (needs opencv-python)")
    parser.add_argument("--samples", action="store_true",
                        help="print the release's sample images' figures, Octave vs ours")
    args = parser.parse_args()
    ref = args.reference_repo.resolve()
    synthetic = load_synthetic()
    version = subprocess.run([args.octave, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = {}
        for name, kind, h, w, seed in synthetic.CASES:
            res, tgt = synthetic.make_case(kind, h, w, seed)
            pairs[name] = (work / f"{name}-result.png", work / f"{name}-target.png")
            Image.fromarray(res).save(pairs[name][0])
            Image.fromarray(tgt).save(pairs[name][1])
        results = {"matlab": matlab_protocol(args.octave, ref, pairs, work),
                   "rcdnet": rcdnet_protocol(args.octave, ref, pairs, work)}
        sources = {
            "matlab": f"{MATLAB_DIR}/evaluate_PSNR_SSIM.m in {version}, image package",
            "rcdnet": f"{RCDNET_DIR}/psnr.m and ssim.m as statistic.m calls them, {version}",
        }
        if args.basicsr:
            import cv2

            results["basicsr"] = basicsr_protocol(ref, pairs)
            sources["basicsr"] = (f"basicsr/metrics/psnr_ssim.py (test_y_channel=True, "
                                  f"crop_border=0), OpenCV {cv2.__version__}, "
                                  f"numpy {np.__version__}")
        ties, sample = tie_colours(), sample_colours()
        tie_y8, _ = octave_y(args.octave, ties, work)
        sample_y8, sample_yd = octave_y(args.octave, sample, work)
        if args.samples:
            release_samples(args.octave, ref, work, args.basicsr)

    doc = {
        "about": "Figures of the release's metric scripts on the images of "
                 "tests/fixtures/metrics/synthetic.py; made by tools/make_metric_vectors.py.",
        "sources": sources,
        "cases": {
            name: {"kind": kind, "height": h, "width": w, "seed": seed,
                   **{p: figures(results[p][name]) for p in results}}
            for name, kind, h, w, seed in synthetic.CASES
        },
        "rgb2ycbcr": {
            "tie_colours": {"rgb": ties.tolist(), "octave_y_uint8": tie_y8},
            "sample_colours": {"rgb": sample.tolist(), "octave_y_uint8": sample_y8,
                               "octave_y_double": sample_yd},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    # One line per innermost list keeps the colour tables short.
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

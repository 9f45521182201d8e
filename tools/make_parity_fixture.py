"""Generates tests/fixtures/parity.npz by running the official PyTorch release.

    pip install torch   # only this tool needs PyTorch (the fixture: 2.14.1)
    python tools/make_parity_fixture.py --reference-repo PATH/TO/DRSformer

PATH/TO/DRSformer is a checkout of the authors' release (cschenxiang/DRSformer);
its architecture files are imported from there, nothing of it is copied here.
For each small configuration below, the release model gets deterministic
pseudo-random weights (`drsformer_jax.testing.random_state_dict`, which the
tests regenerate bit for bit) and runs on awkward inputs, in float32 and,
with the model `.double()` and the input cast to float64, in float64; the
fixture keeps the configuration, the tensor names and shapes in the release's
order, the input, the release's float32 output (`output`) and float64 output
(as `output64_minus_output`, float32: output64 = output + that, in float64,
exact to ~1e-13, at half the size of float64 values), and, per top-k
sparsity, the smallest gap between the k-th and (k+1)-th largest scores of a
row relative to the row's range seen in the float64 run (`topk_gap`, and
`topk_gap32` in the float32 run): below `drsformer_jax.parity.NEAR_TIE` a
float32 run may keep a different entry. It also writes
tests/fixtures/torch_tensors.pth, a small file made by torch.save for the torch-free reader's tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from drsformer_jax.parity import run_release  # noqa: E402
from drsformer_jax.release import release_class  # noqa: E402
from drsformer_jax.testing import odd_images, random_state_dict  # noqa: E402

# Seeds 2023-2032 all have a top-k row within 1e-5 of a tie (relative gap) in some
# variant; 2033 has none, so the float32 comparison is meaningful for every case.
SEED = 2033
VARIANTS = {
    "mefc": dict(dim=16, num_blocks=[1, 1, 1, 2], heads=[1, 2, 4, 8],
                 ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
    "no_mefc": dict(dim=16, num_blocks=[1, 1, 1, 2], heads=[1, 2, 4, 8],
                    ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
    # Exercises the converter's inference of bias=True, BiasFree and the FFN width.
    "biasfree_bias": dict(dim=16, num_blocks=[1, 1, 1, 1], heads=[1, 2, 2, 4],
                          ffn_expansion_factor=2.0, bias=True, LayerNorm_type="BiasFree"),
}
INPUT_SHAPE = (2, 48, 64)


def our_config(variant: str) -> dict:
    v = VARIANTS[variant]
    return {"inp_channels": 3, "out_channels": 3, "dim": v["dim"],
            "num_blocks": v["num_blocks"], "heads": v["heads"],
            "ffn_expansion_factor": v["ffn_expansion_factor"], "bias": v["bias"],
            "layernorm_type": v["LayerNorm_type"], "use_mefc": variant != "no_mefc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", required=True, type=Path)
    parser.add_argument("--output-dir", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests" / "fixtures")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # deterministic reductions
    x = odd_images(*INPUT_SHAPE)
    fixture: dict[str, np.ndarray] = {"seed": np.array(SEED), "input": x,
                                      "torch_version": np.array(torch.__version__)}
    for variant, kwargs in VARIANTS.items():
        cls = release_class(args.reference_repo, variant != "no_mefc", user="this tool")
        model = cls(**kwargs).eval()
        names_shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        sd = random_state_dict(names_shapes, SEED)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
        out64, gaps64 = run_release(model, x, "float64")
        out, gaps32 = run_release(model, x, "float32")
        moved = float(np.abs(out - x).mean())
        print(f"{variant}: {len(sd)} tensors, "
              f"{sum(v.size for v in sd.values()):,} parameters, mean |out - in| = {moved:.3f}, "
              f"float32 - float64 {np.abs(out - out64).max():.3g}, smallest relative top-k "
              f"gap {min(gaps64):.3g} (float64), {min(gaps32):.3g} (float32)")
        fixture[f"{variant}/config"] = np.array(json.dumps(our_config(variant)))
        fixture[f"{variant}/names"] = np.array([n for n, _ in names_shapes])
        fixture[f"{variant}/shapes"] = np.array(["x".join(map(str, s)) for _, s in names_shapes])
        fixture[f"{variant}/output"] = out.astype(np.float32)
        residual = (out64 - out.astype(np.float64)).astype(np.float32)
        assert np.abs(out.astype(np.float64) + residual - out64).max() < 1e-12
        fixture[f"{variant}/output64_minus_output"] = residual
        fixture[f"{variant}/topk_gap"] = np.array(gaps64, np.float64)
        fixture[f"{variant}/topk_gap32"] = np.array(gaps32, np.float64)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output_dir / "parity.npz", **fixture)

    # A small real torch.save file: dtypes, a 0-d tensor, a view sharing storage, a
    # transposed (non-contiguous) tensor. Contents follow closed forms the tests check.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"f32": base, "f64": torch.arange(5, dtype=torch.float64) / 4,
               "f16": torch.arange(6, dtype=torch.float16) - 2,
               "bf16": torch.arange(4, dtype=torch.bfloat16) * 0.5,
               "i64": torch.arange(-3, 3, dtype=torch.int64), "scalar": torch.tensor(2.5),
               "view": base[:, 2], "transposed": base.t(), "conv": torch.ones(2, 1, 3, 3)}
    torch.save({"params": tensors}, args.output_dir / "torch_tensors.pth")
    print(f"wrote {args.output_dir / 'parity.npz'} and torch_tensors.pth")


if __name__ == "__main__":
    main()

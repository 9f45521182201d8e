"""The authors' release (cschenxiang/DRSformer): its training recipe and its PyTorch model.

`RELEASE_OPTIM` is the optimisation of the release's Options/Deraining.yml, read by
configs/default.py, the benchmarks and the compile report. `release_class` imports
the release's DRSformer class from a checkout of its code (nothing of it is copied
here): the parity check, `benchmark --compare-torch` and the fixture tools all load
it this way. PyTorch is imported only when that class is asked for.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

# The release's optimisation settings (Options/Deraining.yml): L1 loss, AdamW, a constant
# learning rate for 92k iterations then cosine to 1e-6 over 208k, seed 100 (manual_seed).
RELEASE_OPTIM = dict(learning_rate=3e-4, min_learning_rate=1e-6, lr_constant_steps=92_000,
                     lr_cosine_steps=208_000, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
                     weight_decay=1e-4, grad_clip_norm=0.01, seed=100)
# The release's architecture file, by whether the model has MEFC (Rain200L and SPA-Data
# were trained without it).
ARCH_FILES = {True: "DRSformer_arch.py", False: "DRSformer_arch_200L+SPA.py"}


class ReleaseError(RuntimeError):
    """The release's code cannot be loaded: no checkout of it, or no PyTorch."""


def import_torch(user: str = "the parity check") -> Any:
    """PyTorch, or a ReleaseError naming `user` (what needs it) when it is not installed."""
    try:
        import torch
    except ImportError:
        raise ReleaseError(f"PyTorch is not installed: {user} runs the release's "
                           "PyTorch code (pip install torch)") from None
    return torch


def release_class(reference_repo: str | Path, use_mefc: bool = True,
                  user: str = "the parity check") -> type:
    """The release's DRSformer class (with MEFC or not), imported from a checkout of
    cschenxiang/DRSformer at `reference_repo`.

    Checks the checkout first, then PyTorch (a ReleaseError for either, `user` naming
    what needs PyTorch), and only then runs the architecture file.
    """
    path = Path(reference_repo) / "basicsr" / "models" / "archs" / ARCH_FILES[use_mefc]
    if not path.is_file():
        raise ReleaseError(f"{path}: not found; --reference-repo must be a checkout of "
                           f"cschenxiang/DRSformer")
    import_torch(user)
    return runpy.run_path(str(path))["DRSformer"]

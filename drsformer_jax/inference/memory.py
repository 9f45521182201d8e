"""How much memory a forward pass needs, and how much there is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

# Memory of a forward pass (float32) beyond the weights, in bytes per pixel per unit
# of the model's `dim`; batch elements add up. Measured, then rounded up:
# - "cpu": the rise of the process's peak resident memory over one pass (programs
#   loaded from the compilation cache): the released model 313 bytes at 256x384 and
#   492 at 128x192 (a fixed part weighs more there), dim 16 without MEFC 259..295.
# - "tpu" and GPUs ("default"): XLA's buffer assignment of the platform's own
#   formulation, compiled for the chip from a CPU host (`compile_report`):
#   temporaries grow by ~143 (TPU v5e) and ~173 (H100) bytes per pixel per dim from
#   256x256 to 512x512; no GPU autotuning then, so GPUs keep a larger margin.
#   Should a pass still run out of device memory, `restore_jobs` retries it one
#   image at a time, then with smaller tiles (`Restorer.after_out_of_memory`).
BYTES_PER_PIXEL_PER_DIM = {"cpu": 600, "tpu": 200, "default": 260}
MEMORY_FRACTION = 0.8  # of the free memory a pass may plan to use: room for XLA's extras


def estimate_memory(dim: int, height: int, width: int, batch: int = 1,
                    backend: str | None = None) -> int:
    """Bytes a forward pass of a batch of (height, width) images needs beyond the weights.

    The documented rule: BYTES_PER_PIXEL_PER_DIM[backend] * dim * height * width *
    batch, backend ("cpu", "tpu", "cuda", ...) defaulting to JAX's default backend.
    """
    backend = backend or jax.default_backend()
    per_pixel = BYTES_PER_PIXEL_PER_DIM.get(backend, BYTES_PER_PIXEL_PER_DIM["default"])
    return per_pixel * dim * height * width * batch


def available_memory(device: Any = None) -> int | None:
    """Free memory for a forward pass on `device` (default: the first local one).

    CPU: the host's available RAM (MemAvailable, or the cgroup's limit when that is
    smaller). Accelerators: the device allocator's limit minus what is in use (the
    weights, once loaded). None when the platform does not say.
    """
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    free = _meminfo_available()
    cgroup = _cgroup_free()
    options = [v for v in (free, cgroup) if v is not None]
    return min(options) if options else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_free() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return int(limit) - int(used)



def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device or host allocation failure (worth retrying smaller)."""
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


"""Restoring a list of images with a Restorer: grouped by program, I/O on threads.

A `Job` is one image: how to load it and what to do with the result (write a
PNG, score it against a target). `restore_jobs` is what derain, `--mode
evaluate` and training's evaluation run.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from drsformer_jax.inference.memory import is_out_of_memory
from drsformer_jax.inference.restorer import Plan, Restorer


@dataclass(frozen=True)
class Job:
    """One image to restore.

    `load` returns (RGB float HxWx3 in [0, 1], anything `save` needs) and raises a
    ValueError (ImageReadError, DatasetError) naming the input when it cannot be
    read; `save` gets the restored RGB and that context, and raises OSError (or a
    ValueError naming the image) when it fails. `size` is (H, W) as `load` will give
    it (from the file's header).
    """

    name: str
    size: tuple[int, int]
    load: Callable[[], tuple[np.ndarray, Any]]
    save: Callable[[np.ndarray, Any], None]


def restore_jobs(restorer: Restorer, jobs: Sequence[Job], *, desc: str = "derain",
                 progress: bool = True) -> tuple[int, list[str]]:
    """Restores every job; returns (how many were done, one line per failure).

    Jobs are grouped by the program they run in (`Restorer.plan`), so each
    program compiles once, and run a batch at a time; inputs are read and outputs
    written on threads while the model runs. A job that cannot be read, restored
    or written gives one line in the failures (also shown as it happens) and the
    others go on. `progress`: a progress bar with images/s on stderr.
    """
    return _JobRunner(restorer, jobs, desc, progress).run()


def _chunks(plans: Sequence[Plan]) -> list[list[int]]:
    """Job indices grouped into model calls: same plan, at most one batch (or one tiled image)."""
    first: dict[Any, int] = {}
    for i, plan in enumerate(plans):
        first.setdefault(plan.key, i)
    chunks: list[list[int]] = []
    for i in sorted(range(len(plans)), key=lambda i: (first[plans[i].key], i)):
        per_call = 1 if plans[i].tile is not None else plans[i].batch
        last = chunks[-1] if chunks else None
        if last and plans[last[0]].key == plans[i].key and len(last) < per_call:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


class _JobRunner:
    def __init__(self, restorer: Restorer, jobs: Sequence[Job], desc: str, progress: bool):
        self.restorer, self.jobs = restorer, jobs
        self.plans = [restorer.plan(*job.size) for job in jobs]
        self.counts = collections.Counter(plan.key for plan in self.plans)
        self.failures: list[str] = []
        self.done = 0
        self.seen: set[Any] = set()
        self.downgraded: dict[Any, Plan] = {}  # plan key -> the smaller plan that worked
        self.saving: collections.deque[tuple[int, Future]] = collections.deque()
        self.bar = tqdm(total=len(jobs), desc=desc, unit="img", file=sys.stderr,
                        dynamic_ncols=True, disable=not progress)

    def show_tiles(self, done: int, total: int) -> None:
        """Per-tile progress of a tiled image, in the bar's postfix (large images take long)."""
        if total > 1:
            self.bar.set_postfix_str(f"tile {done}/{total}", refresh=True)

    def say(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def fail(self, line: str) -> None:
        self.failures.append(line)
        self.say(f"error: {line}")
        self.bar.update(1)

    def run(self) -> tuple[int, list[str]]:
        chunks = _chunks(self.plans)
        with ThreadPoolExecutor(max_workers=2) as pool:
            loading = [pool.submit(self.jobs[i].load) for i in chunks[0]] if chunks else []
            for c, chunk in enumerate(chunks):
                loaded = loading
                if c + 1 < len(chunks):
                    loading = [pool.submit(self.jobs[i].load) for i in chunks[c + 1]]
                self.restore_chunk(pool, chunk, loaded)
                # Bounded backlog of pending writes: restored images wait in memory.
                self.settle(keep=2 * max(len(chunk), 1))
            self.settle(keep=0)
        self.bar.close()
        return self.done, self.failures

    def restore_chunk(self, pool: ThreadPoolExecutor, chunk: list[int],
                      loaded: list[Future]) -> None:
        ready = []
        for i, future in zip(chunk, loaded, strict=True):
            try:
                ready.append((i, *future.result()))
            except ValueError as e:  # ImageReadError and the like name their file
                self.fail(str(e))
        # The header's size is what was planned; re-plan if decoding disagrees.
        groups: dict[Plan, list[tuple[int, np.ndarray, Any]]] = {}
        for item in ready:
            groups.setdefault(self.restorer.plan(*item[1].shape[:2]), []).append(item)
        for plan, items in groups.items():
            if plan.note:
                for i, _, _ in items:
                    self.say(f"note: {self.jobs[i].name}: {plan.note}")
            if plan.key not in self.seen:
                self.seen.add(plan.key)
                what = f"{plan.size[1]}x{plan.size[0]}" + (" tiles" if plan.tile else "")
                self.bar.set_postfix_str(f"compiling for {what}", refresh=True)
            restored = self.restore_or_retry(items, plan)
            self.bar.set_postfix_str("")
            if isinstance(restored, BaseException):  # one bad batch must not stop others
                for i, _, _ in items:
                    self.fail(f"{self.jobs[i].name}: restoration failed "
                              f"({_first_line(restored)})")
                continue
            for (i, _, context), out in zip(items, restored, strict=True):
                self.saving.append((i, pool.submit(self.jobs[i].save, out, context)))

    def restore_or_retry(self, items: list[tuple[int, np.ndarray, Any]],
                         plan: Plan) -> list[np.ndarray] | BaseException:
        """Restored images, retried smaller after an out-of-memory error; or the error.

        A plan that ran out of memory is not tried again: later images of that plan
        go straight to the smaller one that worked.
        """
        key = plan.key
        plan = self.downgraded.get(key, plan)
        while True:
            try:
                restored = self.restorer.restore([rgb for _, rgb, _ in items], plan,
                                                 group_size=self.counts[key],
                                                 on_tiles=self.show_tiles)
                if plan.key != key:
                    self.downgraded[key] = plan
                return restored
            except Exception as e:
                plan = self.restorer.after_out_of_memory(plan) if is_out_of_memory(e) else None
                if plan is None:
                    return e
                names = ", ".join(self.jobs[i].name for i, _, _ in items)
                self.say(f"note: {names}: {plan.note}")

    def settle(self, keep: int) -> None:
        """Waits for pending writes until at most `keep` are left."""
        while len(self.saving) > keep:
            i, future = self.saving.popleft()
            try:
                future.result()
            except OSError as e:
                self.fail(f"{self.jobs[i].name}: cannot write the output ({e.strerror or e})")
                continue
            except ValueError as e:
                self.fail(f"{self.jobs[i].name}: {e}")
                continue
            self.done += 1
            self.bar.update(1)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

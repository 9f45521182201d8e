"""Reproduce the paper's Tables 1 and 2 with the release's weights and test sets.

    python -m drsformer_jax.reproduce --weights DIR --data DIR
        [--sets Rain200L,Rain200H,DID-Data,DDN-Data,SPA-Data,Real] [--output report]
        [--ensemble] [--tile N] [--tile-overlap PX] [--tile-blend box|cosine]
        [--batch-size B] [--cache-dir DIR] [--memory-limit GIB]

Each test set found is derained with its own checkpoint and scored with its
benchmark protocol (Rain200L/H, SPA-Data: MATLAB's evaluate_PSNR_SSIM.m; DID-Data,
DDN-Data: RCDNet's statistic.m; Real: NIQE / BRISQUE of inputs and outputs).
Writes OUTPUT/<set>/*.png and OUTPUT/<set>/score.json, then one table beside the
paper's published figures with the difference per cell: printed, and written as
OUTPUT/report.md and OUTPUT/report.json.

--weights: a folder of checkpoints (the release's .pth files, export folders from
`convert`, or training workdirs), each matched to a set by its name, case and
punctuation ignored (Rain200H.pth, rain200h/, DRSformer_DID-Data.pth; DID-Data,
DDN-Data and SPA-Data also match did, ddn, spa; Real matches real or internet,
else it uses the Rain200H weights); or one checkpoint for every set (a file, or a
folder whose only checkpoint names no set, such as test.py's deraining.pth).
--data: the release's layout (Datasets/test/<set>/{input,target}) or this
project's (data/test/<set>/...): DIR may be the folder holding Datasets/ or data/,
that folder itself, or its test/ folder. Real needs input/ only.

A set without data or weights is one line and the others go on. Without --sets
every set whose data is found is run. Exit status: 0 when every set ran and every
image was scored; 1 otherwise (the report still covers the others); 2 for bad flags.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drsformer_jax.data.sources import (
    DatasetError,
    FolderPairs,
    find_inputs,
    find_pairs,
    natural_key,
)
from drsformer_jax.derain import add_restore_flags
from drsformer_jax.evaluation.evaluator import BENCHMARK_PROTOCOLS, restore_pairs
from drsformer_jax.evaluation.scores import (
    SCORE_FILE,
    needs_targets,
    parse_protocol,
    score_document,
    write_score_file,
)
from drsformer_jax.inference import Restorer, make_restorer
from drsformer_jax.utils.files import (
    ensure_writable_dir,
    first_names,
    quiet_library_logs,
    write_bytes_atomic,
    write_json_atomic,
)

TABLE1_SETS = ("Rain200L", "Rain200H", "DID-Data", "DDN-Data", "SPA-Data")
REAL_SET = "Real"
SETS = (*TABLE1_SETS, REAL_SET)

# The paper's published figures (shared/seed/drsformer-cvpr2023.md; tests/test_reproduce.py
# checks them against its tables). Table 1, DRSformer's row: PSNR (dB) / SSIM, Y channel.
PAPER_TABLE1 = {
    "Rain200L": {"psnr": 41.23, "ssim": 0.9894},
    "Rain200H": {"psnr": 32.17, "ssim": 0.9326},
    "DID-Data": {"psnr": 35.35, "ssim": 0.9646},
    "DDN-Data": {"psnr": 34.35, "ssim": 0.9588},
    "SPA-Data": {"psnr": 48.54, "ssim": 0.9924},
}
# Table 2, NIQE / BRISQUE (lower is better) on 20 real rainy images from Internet-Data:
# the rainy inputs' column and DRSformer's ("Ours").
PAPER_TABLE2 = {
    "input": {"niqe": 5.829, "brisque": 33.129},
    "DRSformer": {"niqe": 4.095, "brisque": 22.730},
}
PAPER_SOURCE = ("Chen et al., Learning A Sparse Transformer Network for Effective Image "
                "Deraining, CVPR 2023: Table 1 (DRSformer row), Table 2 (Rainy Input, Ours)")

# Names a checkpoint may carry for each set (lower case, letters and digits only).
WEIGHT_NAMES = {
    "Rain200L": ("rain200l",), "Rain200H": ("rain200h",), "DID-Data": ("diddata", "did"),
    "DDN-Data": ("ddndata", "ddn"), "SPA-Data": ("spadata", "spa"),
    REAL_SET: ("real", "internet"),
}
REAL_FALLBACK = "Rain200H"  # configs/real.py: real rain through the released Rain200H model


class SetSkippedError(Exception):
    """A set that cannot run; the message is its one line."""


@dataclass
class SetResult:
    name: str
    protocol: str
    weights: str
    images: int
    failures: list[str]
    mean: dict[str, float]
    seconds: float
    note: str | None = None  # files of the set that were left out, and why


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _checkpoint_entries(folder: Path) -> list[Path]:
    """The checkpoints a weights folder offers: .pth files and sub-folders."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() == ".pth"))


def find_weights(weights: Path, dataset: str) -> tuple[Path, str | None]:
    """The checkpoint for `dataset` under `weights` (a folder, or one checkpoint for all),
    and a note when it was not matched by the set's own name. Raises SetSkippedError."""
    if not weights.exists():
        raise SetSkippedError(f"--weights {weights} does not exist")
    if weights.is_file() or (weights / "config.json").exists() \
            or (weights / "checkpoints").is_dir():
        return weights, None  # one checkpoint (a .pth, an export folder or a workdir)
    entries = _checkpoint_entries(weights)
    found = [p for p in entries
             if any(alias in _normalised(p.stem) for alias in WEIGHT_NAMES[dataset])]
    exact = [p for p in found if _normalised(p.stem) in WEIGHT_NAMES[dataset]]
    found = exact or found
    if len(found) > 1:
        raise SetSkippedError(f"several checkpoints in {weights} match {dataset}: "
                         + ", ".join(p.name for p in found) + "; keep one")
    if found:
        return found[0], None
    named = [p for p in entries if any(alias in _normalised(p.stem)
                                       for aliases in WEIGHT_NAMES.values() for alias in aliases)]
    if len(entries) == 1 and not named:  # e.g. test.py's default deraining.pth alone
        return entries[0], f"the only checkpoint in {weights}, {entries[0].name}, is used"
    if dataset == REAL_SET:
        fallback, _ = find_weights(weights, REAL_FALLBACK)
        return fallback, f"no Real weights in {weights}: using {REAL_FALLBACK}'s, {fallback.name}"
    raise SetSkippedError(f"no weights in {weights} for {dataset} (a .pth file or folder named "
                     f"like {' / '.join(WEIGHT_NAMES[dataset])})")


def _data_roots(data: Path) -> list[tuple[Path, str]]:
    """(root, split) pairs to look for <root>/<split>/<set> in, in order."""
    return [(data, "test"), (data / "Datasets", "test"), (data / "data", "test"),
            (data.parent, data.name)]


def find_test_set(data: Path, dataset: str) -> tuple[FolderPairs, str | None] | None:
    """The set's test pairs (inputs alone for Real) under `data`, and a note when some files
    do not pair; None when the set's folder is absent. Raises SetSkippedError when it is
    there but unusable (no target folder, nothing pairs, two images with one name)."""
    for root, split in _data_roots(data):
        if (root / split / dataset).is_dir():
            try:
                if dataset == REAL_SET:
                    return find_inputs(root, dataset, split), None
                pairs = find_pairs(root, dataset, split, strict=False)
            except DatasetError as e:
                raise SetSkippedError(str(e)) from None
            left = sorted([*pairs.unpaired_inputs,
                           *(f"target/{name}" for name in pairs.unpaired_targets)],
                          key=natural_key)
            note = (f"{len(left)} file(s) without a partner left out: " + first_names(left)
                    if left else None)
            return pairs, note
    return None


def run_set(restorer: Restorer, pairs: FolderPairs, dataset: str, weights: str,
            out_dir: Path) -> SetResult:
    """Derains and scores one test set; writes its PNGs and score.json to `out_dir`."""
    protocol = BENCHMARK_PROTOCOLS[dataset]
    with_targets = needs_targets(parse_protocol(protocol))
    start = time.perf_counter()
    scores, failures = restore_pairs(restorer, pairs, range(len(pairs)), protocol,
                                     out_dir=out_dir, desc=dataset)
    mean: dict[str, float] = {}
    if scores:
        # Full-reference: the results' figures (score.json's layout); Real: inputs' too.
        doc = score_document({n: {k: v for k, v in s.items()
                                  if not (with_targets and k.startswith("input_"))}
                              for n, s in scores.items()}, protocol)
        write_score_file(out_dir / SCORE_FILE, doc)
        mean = doc["mean"]
    return SetResult(dataset, protocol, weights, len(scores), failures, mean,
                     time.perf_counter() - start)


def paper_figures(dataset: str) -> dict[str, float]:
    """The paper's figures for a set's `mean` keys (Real: outputs and input_ keys)."""
    if dataset == REAL_SET:
        ours, rainy = PAPER_TABLE2["DRSformer"], PAPER_TABLE2["input"]
        return {**ours, **{f"input_{k}": v for k, v in rainy.items()}}
    return dict(PAPER_TABLE1[dataset])


def _cell(ours: float | None, paper: float, digits: int) -> list[str]:
    if ours is None:
        return ["-", f"{paper:.{digits}f}", "-"]
    return [f"{ours:.{digits}f}", f"{paper:.{digits}f}", f"{ours - paper:+.{digits}f}"]


def report_markdown(results: Sequence[SetResult], skipped: dict[str, str],
                    options: str) -> str:
    """report.md: Table 1 and Table 2 rows side by side with the paper's, differences."""
    lines = [f"# DRSformer: the paper's tables reproduced ({options})", ""]
    table1 = [r for r in results if r.name in PAPER_TABLE1]
    if table1:
        lines += ["Table 1 (PSNR dB / SSIM, Y channel): ours, the paper's, ours - paper", "",
                  "| set | protocol | images | PSNR | paper | diff | SSIM | paper | diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in table1:
            paper = PAPER_TABLE1[r.name]
            lines.append("| " + " | ".join(
                [r.name, r.protocol, str(r.images), *_cell(r.mean.get("psnr"), paper["psnr"], 2),
                 *_cell(r.mean.get("ssim"), paper["ssim"], 4)]) + " |")
        lines.append("")
    for r in (r for r in results if r.name == REAL_SET):
        lines += ["Table 2 (NIQE / BRISQUE, lower is better): ours, the paper's, ours - paper",
                  "", "| Real | images | NIQE | paper | diff | BRISQUE | paper | diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, prefix, paper in (("rainy inputs", "input_", PAPER_TABLE2["input"]),
                                     ("derained", "", PAPER_TABLE2["DRSformer"])):
            lines.append("| " + " | ".join(
                [label, str(r.images), *_cell(r.mean.get(prefix + "niqe"), paper["niqe"], 3),
                 *_cell(r.mean.get(prefix + "brisque"), paper["brisque"], 3)]) + " |")
        lines.append("")
    for r in results:
        if r.note:
            lines.append(f"- {r.name}: {r.note}")
        if r.failures:
            lines.append(f"- {r.name}: {len(r.failures)} image(s) left out: {r.failures[0]}")
    for name, why in skipped.items():
        lines.append(f"- {name}: not run: {why}")
    lines += ["", f"Paper: {PAPER_SOURCE}."]
    return "\n".join(lines).rstrip() + "\n"


def report_document(results: Sequence[SetResult], skipped: dict[str, str],
                    options: dict[str, Any]) -> dict[str, Any]:
    """report.json: per set its mean figures, the paper's and the differences."""
    sets = {}
    for r in results:
        paper = paper_figures(r.name)
        sets[r.name] = {
            "protocol": r.protocol, "weights": r.weights, "images": r.images,
            "failures": r.failures, "note": r.note, "seconds": round(r.seconds, 2),
            "mean": r.mean,
            "paper": paper,
            "difference": {k: r.mean[k] - v for k, v in paper.items() if k in r.mean}}
    return {"options": options, "sets": sets, "skipped": skipped, "paper_source": PAPER_SOURCE}


def _parse_sets(text: str | None) -> list[str] | None:
    if text is None:
        return None
    by_key = {_normalised(s): s for s in SETS}
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if _normalised(n) not in by_key]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown set {', '.join(unknown) or repr(text)}; choose from {', '.join(SETS)}")
    return list(dict.fromkeys(by_key[_normalised(n)] for n in names))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drsformer_jax.reproduce", description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, metavar="DIR",
                        help="folder of the release's checkpoints (.pth or converted), "
                             "matched to sets by name; or one checkpoint for every set")
    parser.add_argument("--data", required=True, type=Path, metavar="DIR",
                        help="test sets in the release's layout (Datasets/test/<set>/"
                             "{input,target}) or this project's (data/test/<set>)")
    parser.add_argument("--sets", type=_parse_sets, metavar="A,B",
                        help=f"comma-separated, of {', '.join(SETS)} (default: every set "
                             "whose data is found)")
    parser.add_argument("--output", type=Path, default=Path("report"), metavar="DIR",
                        help="where each set's PNGs and score.json, report.md and report.json "
                             "go (default: %(default)s)")
    add_restore_flags(parser)
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"ensemble": args.ensemble, "tile": args.tile, "tile_overlap": args.tile_overlap,
            "tile_blend": args.tile_blend, "buckets": args.buckets,
            "batch_size": args.batch_size}


def _describe(options: dict[str, Any]) -> str:
    what = ["the release's procedure" if not options["ensemble"]
            else "x8 self-ensemble (not the paper's protocol)"]
    if options["tile"]:
        what.append(f"tiles {options['tile']} / overlap {options['tile_overlap']}, "
                    f"{options['tile_blend']} blend")
    return ", ".join(what)


class _Runner:
    """The sets of one command: weights and data per set, one Restorer per checkpoint."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.restorers: dict[Path, Restorer] = {}
        self.results: list[SetResult] = []
        self.skipped: dict[str, str] = {}

    def restorer(self, weights: Path) -> Restorer:
        key = weights.resolve()
        if key not in self.restorers:
            a = self.args
            self.restorers.clear()  # one model in memory at a time
            self.restorers[key] = make_restorer(
                weights, tile=a.tile, tile_overlap=a.tile_overlap, buckets=a.buckets,
                batch_size=a.batch_size, memory_limit_gib=a.memory_limit,
                cache_dir=a.cache_dir, ensemble=a.ensemble, tile_blend=a.tile_blend)
        return self.restorers[key]

    def skip(self, dataset: str, why: str) -> None:
        self.skipped[dataset] = why
        print(f"error: {dataset}: {why}", file=sys.stderr, flush=True)

    def run(self, dataset: str, explicit: bool) -> None:
        try:
            found = find_test_set(self.args.data, dataset)
            if found is None:
                if explicit:
                    self.skip(dataset, f"no test data under {self.args.data} (looked for "
                              f"test/{dataset}, Datasets/test/{dataset}, data/test/{dataset})")
                return
            pairs, left_out = found
            if left_out:
                print(f"note: {dataset}: {left_out}", file=sys.stderr, flush=True)
            weights, note = find_weights(self.args.weights, dataset)
            if note:
                print(f"note: {dataset}: {note}", file=sys.stderr, flush=True)
            restorer = self.restorer(weights)
        except SetSkippedError as e:
            return self.skip(dataset, str(e))
        except ValueError as e:  # CheckpointError: a checkpoint that does not load
            return self.skip(dataset, str(e).splitlines()[0])
        out_dir = self.args.output / dataset
        print(f"{dataset}: {len(pairs)} images, {BENCHMARK_PROTOCOLS[dataset]} protocol, "
              f"weights {weights} -> {out_dir}", flush=True)
        self.results.append(run_set(restorer, pairs, dataset, str(weights), out_dir))
        self.results[-1].note = left_out


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    quiet_library_logs()
    try:
        ensure_writable_dir(args.output)
    except OSError as e:
        print(f"error: --output {args.output}: cannot write there ({e.strerror or e})",
              file=sys.stderr)
        return 1
    runner = _Runner(args)
    try:
        for dataset in args.sets or SETS:
            runner.run(dataset, explicit=args.sets is not None)
    except KeyboardInterrupt:
        print("error: interrupted; the sets finished so far have their score.json",
              file=sys.stderr)
        return 130
    if not runner.results and not runner.skipped:
        runner.skip("sets", f"no test set found under {args.data} (expected "
                    "Datasets/test/<set>/{input,target} or data/test/<set>/...)")
    options = _options(args)
    markdown = report_markdown(runner.results, runner.skipped, _describe(options))
    write_bytes_atomic(args.output / "report.md", markdown.encode())
    write_json_atomic(args.output / "report.json",
                      report_document(runner.results, runner.skipped, options))
    print("\n" + markdown + f"\n-> {args.output / 'report.md'}, {args.output / 'report.json'}")
    failed = runner.skipped or any(r.failures for r in runner.results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

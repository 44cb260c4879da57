"""`python -m data_pipeline <command>` (also `brushnet-data`): filter | download | label | validate | chain |
demo | bench. Every stage command takes `--config FILE` and one flag per config field (`--filter.min_side`,
`--label.sam.checkpoint`, ...: from the typed config in data_pipeline.config). This module composes the
stages; they never import each other."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser

from brushnet.console import run_console
from data_pipeline.config import PipelineConfig, add_config_arguments, load_config
from data_pipeline.layout import RunLayout
from data_pipeline.progress import StageReport, format_summary
from data_pipeline.sharding import WHOLE_JOB, TaskSlice, resolve_task_slice

COMMANDS = {
    "filter": "filter/dedupe/shuffle metadata parquets into parts",
    "download": "img2dataset download of the filtered parts (resumable)",
    "label": "object masks -> official BrushData shards (resumable)",
    "validate": "decode every sample, report bad ones, write index.json",
    "chain": "all four stages",
    "demo": "offline demo: skimage photos on a loopback server -> the whole chain",
}
_RUN_FLAGS = ("config", "shard_index", "num_shards", "split_by", "verbose")  # not config fields


def _stage_parser(command: str) -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    default = "configs/data/demo.yaml" if command == "demo" else "the built-in defaults"
    p.add_argument("--config", type=Path, help=f"pipeline YAML (configs/data/*.yaml; default: {default})")
    add_config_arguments(p)
    p.add_argument("--shard-index", type=int, help="this task's index (default: SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--num-shards", type=int, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    if command == "label":
        p.add_argument(
            "--split-by",
            choices=["part", "shard"],
            help="tasks own whole parts, or single shards (default: shard; chain always splits by part)",
        )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m data_pipeline", description=__doc__, exit_on_error=False)
    sub = parser.add_subcommands(dest="command", required=True)
    for command, help_ in COMMANDS.items():
        sub.add_subcommand(command, _stage_parser(command), help=help_)
    bench = ArgumentParser(exit_on_error=False)  # defaults: run_bench's
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--images", type=int, help="images per labeller (default 8)")
    bench.add_argument("--urls", type=int, help="URLs served on loopback (default 200)")
    bench.add_argument(
        "--sam-encoder", help="also time a full-size SAM image encoder, e.g. vit_b (random weights)"
    )
    sub.add_subcommand("bench", bench, help="label images/s, shard write MB/s, img2dataset loopback rate")
    return parser


def stage_failed(report: StageReport) -> bool:
    """A stage that leaves work undone (the command should exit non-zero so schedulers notice)."""
    d = report.details
    return bool(
        d.get("shards_incomplete") or d.get("parts_not_downloaded") or d.get("shards_with_bad_samples")
    )


def run_stage(
    command: str, cfg: PipelineConfig, task: TaskSlice = WHOLE_JOB, split_by: str = "shard"
) -> StageReport:
    """One stage on the run folder `cfg.out` (the stages are imported here only: heavy imports)."""
    run = RunLayout(Path(cfg.out))
    if command == "filter":
        from data_pipeline.filter import run_filter

        return run_filter(cfg.metadata, run.filtered, cfg.filter)
    if command == "download":
        from data_pipeline.download import run_download

        return run_download(run.parts(), run.root, cfg.download, task)
    if command == "label":
        from data_pipeline.label import run_label

        return run_label(run.root, run.parts(), cfg.label, task, split_by=split_by)
    if command == "validate":
        from data_pipeline.validate import run_validate

        return run_validate(run.root, task)
    raise ValueError(f"unknown stage {command!r}; expected one of filter, download, label, validate")


def run_chain(cfg: PipelineConfig, task: TaskSlice = WHOLE_JOB) -> int:
    """All four stages; each skips what is already done. Prints the summary table; returns the exit code."""
    reports = [run_stage(s, cfg, task, split_by="part") for s in ("filter", "download", "label", "validate")]
    print(format_summary(reports), flush=True)
    return 1 if any(stage_failed(r) for r in reports) else 0


def _config(command: str, given: dict[str, Any]) -> PipelineConfig:
    """The config file (the demo's by default) with the config flags given on the command line on top."""
    path = given.get("config")
    if path is None and command == "demo":
        from data_pipeline.tools.demo import DEMO_CONFIG

        path = DEMO_CONFIG
    return load_config(path, {k: v for k, v in given.items() if k not in _RUN_FLAGS})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``brushnet-data``; returns the exit status (:func:`brushnet.console.run_console`)."""
    return run_console("brushnet-data", _run, argv)


def _run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv, defaults=False)
    except ArgumentError as e:
        print(f"brushnet-data: error: {' '.join(str(e).split())} (see --help)", file=sys.stderr)
        return 2
    command = args.command
    given = args[command].as_dict()  # only what the command line gives (defaults=False)
    logging.basicConfig(
        level=logging.DEBUG if given.get("verbose") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if command == "bench":
        from data_pipeline.tools.bench import run_bench

        return run_bench(**given)
    cfg = _config(command, given)
    if command == "demo":
        from data_pipeline.tools.demo import run_demo

        return run_demo(cfg)
    task = resolve_task_slice(given.get("shard_index"), given.get("num_shards"))
    if command == "chain":
        return run_chain(cfg, task)
    report = run_stage(command, cfg, task, split_by=given.get("split_by") or "shard")
    print(format_summary([report]), flush=True)
    return 1 if stage_failed(report) else 0

"""`python -m data_pipeline <stage>`: filter | download | label | validate | chain | demo | bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_pipeline.config import ConfigError, PipelineConfig, load_config
from data_pipeline.sharding import resolve_task_slice


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="pipeline YAML (configs/data/*.yaml); defaults built in")
    p.add_argument("--out", type=Path, help="run folder (overrides `out:` in the config)")
    p.add_argument("--shard-index", type=int, help="this task's index (default: SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--num-shards", type=int, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument(
        "--metadata", nargs="+", help="metadata parquet files/folders/globs (overrides the config)"
    )
    p.add_argument("--labeler", choices=["auto", "sam", "classical"], help="overrides label.labeler")
    p.add_argument("--sam-checkpoint", help="overrides label.sam.checkpoint")
    p.add_argument("--sam-model-type", help="overrides label.sam.model_type (vit_h, vit_l, vit_b, tiny)")
    p.add_argument("--retry-failed", type=int, help="overrides download.retry_failed_rounds")
    p.add_argument(
        "--split-by",
        choices=["part", "shard"],
        default="shard",
        help="label: tasks own whole parts, or single shards (default; chain always splits by part)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("filter", "filter/dedupe/shuffle metadata parquets into parts"),
        ("download", "img2dataset download of the filtered parts (resumable)"),
        ("label", "object masks -> official BrushData shards (resumable)"),
        ("validate", "decode every sample, report bad ones, write index.json"),
        ("chain", "all four stages"),
        ("demo", "offline demo: skimage photos on a loopback server -> the whole chain"),
    ]:
        _add_common(sub.add_parser(name, help=help_))
    bench = sub.add_parser("bench", help="label images/s, shard write MB/s, img2dataset loopback rate")
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--images", type=int, default=8)
    bench.add_argument("--urls", type=int, default=200)
    bench.add_argument(
        "--sam-encoder", help="also time a full-size SAM image encoder, e.g. vit_b (random weights)"
    )
    return parser


def _config(args: argparse.Namespace) -> PipelineConfig:
    cfg = load_config(args.config) if args.config else PipelineConfig()
    if args.out:
        cfg.out = str(args.out)
    if args.metadata:
        cfg.metadata = list(args.metadata)
    if args.labeler:
        cfg.label.labeler = args.labeler
    if args.sam_checkpoint:
        cfg.label.sam.checkpoint = args.sam_checkpoint
    if args.sam_model_type:
        cfg.label.sam.model_type = args.sam_model_type
    if args.retry_failed is not None:
        cfg.download.retry_failed_rounds = args.retry_failed
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from data_pipeline.chain import run_chain, stage_failed
    from data_pipeline.progress import format_summary

    try:
        if args.command == "bench":
            from data_pipeline.tools.bench import run_bench

            return run_bench(args.out, images=args.images, urls=args.urls, sam_encoder=args.sam_encoder)
        if args.command == "demo":
            from data_pipeline.tools.demo import run_demo

            return run_demo(args.out or Path("data/demo"), config=args.config, labeler=args.labeler)
        cfg = _config(args)
        task = resolve_task_slice(args.shard_index, args.num_shards)
        if args.command == "chain":
            return run_chain(cfg, task)
        run_dir = Path(cfg.out)
        if args.command == "filter":
            from data_pipeline.filter import run_filter

            report = run_filter(cfg.metadata, run_dir / "filtered", cfg.filter)
        else:
            from data_pipeline.filter import list_parts

            if args.command == "validate":
                from data_pipeline.validate import run_validate

                report = run_validate(run_dir, task)
            elif args.command == "download":
                from data_pipeline.download import run_download

                report = run_download(list_parts(run_dir / "filtered"), run_dir, cfg.download, task)
            else:
                from data_pipeline.label import run_label

                report = run_label(
                    run_dir, list_parts(run_dir / "filtered"), cfg.label, task, split_by=args.split_by
                )
        print(format_summary([report]), flush=True)
        return 1 if stage_failed(report) else 0
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

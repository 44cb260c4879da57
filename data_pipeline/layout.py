"""The run folder (`out:`): where every stage reads and writes, its state records, and the columns of the
filtered parts. The one place that knows these names; the stages only talk to each other through it.

  metadata/, _site/                           demo only: the generated LAION-style parquet, the served photos
  filtered/part-00003.parquet, _SUMMARY.json  filter output (columns below); _SUMMARY.json marks it complete
  download/p00003/{00000.tar, ...}            img2dataset output of part 3
  download/p00003r1/...                       retry round 1 (the `status != success` rows of p00003)
  download/_retry/p00003r1.parquet            the rows retried in round 1
  brushdata/p00003-00000.tar                  label output: official BrushData shards (only tars)
  index.json                                  validate output: the index of the good shards
  state/<stage>/<unit>.json                   a unit of work is done (download, label, validate)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brushnet.atomic import atomic_write_text

# Standard column names of the filtered parts (filter writes them, download hands them to img2dataset).
URL, CAPTION, WIDTH, HEIGHT = "url", "caption", "width", "height"
AESTHETIC, PUNSAFE, PWATERMARK, HASH = "aesthetic_score", "punsafe", "pwatermark", "hash"
EXTRA_COLUMNS = [AESTHETIC, PUNSAFE, PWATERMARK]  # kept by img2dataset (save_additional_columns)

SUMMARY = "_SUMMARY.json"


class RunFolderError(ValueError):
    """A stage's input is not there yet (the message names the folder and the stage to run first)."""


def list_parts(filtered_dir: Path) -> list[Path]:
    """The filtered parts, in order; error if the filter stage has not completed."""
    if not (Path(filtered_dir) / SUMMARY).is_file():
        raise RunFolderError(f"{filtered_dir}: filter stage not complete (no {SUMMARY}); run `filter` first")
    return sorted(Path(filtered_dir).glob("part-*.parquet"))


def part_name(part: Path) -> str:
    """part-00003.parquet -> p00003 (the prefix of its download folders, sample keys and label shards)."""
    return "p" + Path(part).stem.split("-")[-1]


def retry_name(name: str, round_: int) -> str:
    """p00003, 1 -> p00003r1."""
    return f"{name}r{round_}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metadata(self) -> Path:
        return self.root / "metadata"

    @property
    def site(self) -> Path:
        return self.root / "_site"

    @property
    def filtered(self) -> Path:
        return self.root / "filtered"

    def parts(self) -> list[Path]:
        return list_parts(self.filtered)

    @property
    def download(self) -> Path:
        return self.root / "download"

    def retry_input(self, name: str) -> Path:
        return self.download / "_retry" / f"{name}.parquet"

    def download_folders(self, part: str) -> list[Path]:
        """The img2dataset folders of one part: the main one, then the retry rounds, in order."""
        retries = sorted(self.download.glob(f"{part}r*"), key=lambda p: int(p.name[len(part) + 1 :]))
        return [self.download / part, *[r for r in retries if r.is_dir()]]

    @property
    def brushdata(self) -> Path:
        return self.root / "brushdata"

    @property
    def index(self) -> Path:
        return self.root / "index.json"

    def state(self, stage: str) -> Path:
        return self.root / "state" / stage

    def record_path(self, stage: str, unit: str) -> Path:
        return self.state(stage) / f"{unit}.json"

    def read_record(self, stage: str, unit: str) -> dict[str, Any] | None:
        """The done-record of a unit of work, or None when it is not done."""
        path = self.record_path(stage, unit)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_record(self, stage: str, unit: str, data: dict[str, Any]) -> None:
        """Mark a unit of work done (atomically: a record is complete or absent)."""
        atomic_write_text(self.record_path(stage, unit), json.dumps(data, indent=2))

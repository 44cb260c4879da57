"""ok / failed / skipped counters with a tqdm bar, and the final summary table of a stage."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class StageReport:
    """Counts of one stage; `details` holds extra named counts (e.g. per-filter drops, failure reasons)."""

    stage: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    details: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    unit: str = "images"

    def merge(self, other: StageReport) -> None:
        self.ok += other.ok
        self.failed += other.failed
        self.skipped += other.skipped
        self.details.update(other.details)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "unit": self.unit,
            "ok": self.ok,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "details": dict(self.details),
        }


class Progress:
    """A tqdm bar whose postfix shows ok/failed/skipped and the ok rate."""

    def __init__(self, report: StageReport, total: int | None = None) -> None:
        self.report = report
        self._start = time.perf_counter()
        self._bar = tqdm(
            total=total,
            desc=report.stage,
            unit=report.unit[:-1] or "it",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def update(self, ok: int = 0, failed: int = 0, skipped: int = 0) -> None:
        r = self.report
        r.ok += ok
        r.failed += failed
        r.skipped += skipped
        r.seconds = time.perf_counter() - self._start
        self._bar.update(ok + failed + skipped)
        self._bar.set_postfix(ok=r.ok, failed=r.failed, skipped=r.skipped, rate=f"{r.rate:.2f}/s")

    def close(self) -> StageReport:
        self.report.seconds = time.perf_counter() - self._start
        self._bar.close()
        return self.report


def format_summary(reports: list[StageReport]) -> str:
    """A plain-text table: one row per stage, then its details indented."""
    header = f"{'stage':<10} {'unit':<8} {'ok':>8} {'failed':>8} {'skipped':>8} {'seconds':>9} {'ok/s':>8}"
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(
            f"{r.stage:<10} {r.unit:<8} {r.ok:>8} {r.failed:>8} {r.skipped:>8} {r.seconds:>9.1f} {r.rate:>8.2f}"
        )
        for name, count in sorted(r.details.items()):
            lines.append(f"  {name}: {count}")
    return "\n".join(lines)

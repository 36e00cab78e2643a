"""The run's data log: the start-up data summary, and every skipped file counted and logged once.

Every rollout worker indexes the same folder and may meet the same damaged
file, so skips are keyed by file id: the counter
``gdpo_data_skipped_total{reason}`` counts files, not encounters.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

from sr_data.scan import SKIP_REASONS, DataSummary, SkippedFile


class DataLog:
    """Prints and counts skipped data files; ``start_lines`` caps the per-file lines of the start-up summary."""

    def __init__(self, registry: CollectorRegistry | None = None, *, start_lines: int = 20) -> None:
        self.skipped = Counter(
            "gdpo_data_skipped_total", "HR image files left out of training, by reason", ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )  # fmt: skip
        for reason in SKIP_REASONS:  # every series exists from the start, at 0
            self.skipped.labels(reason=reason)
        self._seen: set[str] = set()
        self._start_lines = start_lines

    def start(self, summary: DataSummary) -> None:
        """The data summary line, then (up to ``start_lines``) one line per file skipped while indexing."""
        print(summary, flush=True)
        new = self._new(summary.skipped)
        for skipped in new[: self._start_lines]:
            print(_line(skipped, "indexing"), flush=True)
        if len(new) > self._start_lines:
            print(f"data: ... and {len(new) - self._start_lines} more skipped file(s), counted above", flush=True)

    def record(self, skipped: Iterable[SkippedFile], where: str) -> None:
        """Files a worker (``where``) found unusable while sampling: one line each, the first time."""
        for item in self._new(skipped):
            print(_line(item, where), flush=True)

    def _new(self, skipped: Iterable[SkippedFile]) -> list[SkippedFile]:
        new = []
        for item in skipped:
            if item.file_id not in self._seen:
                self._seen.add(item.file_id)
                self.skipped.labels(reason=item.reason).inc()
                new.append(item)
        return new


def _line(skipped: SkippedFile, where: str) -> str:
    return f"data: skipped {skipped.file_id} ({skipped.reason}: {skipped.detail}) [{where}]"

"""The data log: the start-up summary, and each skipped file counted and logged once whichever worker met it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from rollout.data_log import DataLog
from sr_data.scan import DataSummary, SkippedFile


def _summary(skipped: tuple[SkippedFile, ...]) -> DataSummary:
    return DataSummary(root="/hr", found=30, usable=30 - len(skipped), skipped=skipped, upscaled=0, escaped_names=0,
                       index_check="header")  # fmt: skip


def test_each_file_is_counted_once_by_reason(capsys) -> None:
    registry = CollectorRegistry()
    log = DataLog(registry, start_lines=2)
    small = tuple(SkippedFile(f"s{i}.png", "too_small", "8x8") for i in range(3))
    log.start(_summary(small))
    cut = SkippedFile("cut.jpg", "unreadable", "OSError: image file is truncated")
    log.record([cut], where="rollout0")
    log.record([cut, SkippedFile("holes.png", "transparent", "RGBA")], where="rollout1")  # cut.jpg met again
    count = {r: registry.get_sample_value("gdpo_data_skipped_total", {"reason": r}) for r in
             ("too_small", "unreadable", "transparent", "unlistable", "duplicate_id")}  # fmt: skip
    assert count == {"too_small": 3, "unreadable": 1, "transparent": 1, "unlistable": 0, "duplicate_id": 0}
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "data: 30 image file(s) found in /hr: 27 usable, 3 skipped (too_small 3), 0 upscaled; damage past a "
        "file's header is found, and skipped, when it is first read",
        "data: skipped s0.png (too_small: 8x8) [indexing]",
        "data: skipped s1.png (too_small: 8x8) [indexing]",
        "data: ... and 1 more skipped file(s), counted above",
        "data: skipped cut.jpg (unreadable: OSError: image file is truncated) [rollout0]",
        "data: skipped holes.png (transparent: RGBA) [rollout1]",
    ]

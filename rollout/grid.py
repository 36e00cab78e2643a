"""A picture of what the run is learning: LR | the G samples with reward R and advantage A | HR, a row per group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from common.records import decode_rewards, decode_rollout

_LABEL_HEIGHT = 14
_MIN_TILE = 128  # small crops are enlarged (nearest neighbour: no smoothing is added) to at least this


def _tile(image_chw: np.ndarray, label: str) -> Image.Image:
    """``[3, H, W]`` uint8 or float in [0, 1] -> an RGB tile with a caption strip above it."""
    array = image_chw if image_chw.dtype == np.uint8 else (np.clip(image_chw, 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))
    scale = max(1, -(-_MIN_TILE // max(picture.size)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    tile = Image.new("RGB", (picture.width, picture.height + _LABEL_HEIGHT), "white")
    tile.paste(picture, (0, _LABEL_HEIGHT))
    ImageDraw.Draw(tile).text((2, 1), label, fill="black")
    return tile


def save_sample_grid(batch: pa.RecordBatch, path: str | Path, max_rows: int = 4) -> Path:
    """Write the first ``max_rows`` groups of a scored batch as a PNG grid."""
    groups, rewards = decode_rollout(batch), decode_rewards(batch)
    rows = []
    for n in range(min(max_rows, groups.num_groups)):
        tiles = [_tile(groups.lr[n], "LR (input)")]
        tiles += [
            _tile(groups.sr[n, i], f"SR{i + 1} R={rewards.reward[n, i]:.2f} A={rewards.advantage[n, i]:+.1f}")
            for i in range(groups.group_size)
        ]
        tiles.append(_tile(groups.hr[n], f"HR rho_s={rewards.rho_s[n]:.2f}"))
        rows.append(tiles)
    width = sum(t.width for t in rows[0])
    height = sum(row[0].height for row in rows)
    grid = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for tile in row:
            grid.paste(tile, (x, y))
            x += tile.width
        y += row[0].height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path

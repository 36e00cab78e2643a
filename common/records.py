"""The group record: what crosses every process boundary, as an Arrow record batch.

This module owns the Arrow schema.  Column names live here and nowhere else;
other modules exchange the typed :class:`RolloutGroups` and
:class:`GroupRewards` and call :func:`encode_rollout`, :func:`append_rewards`
and the decoders.  One row is one group: an LR/HR pair and its G samples.
Tensor columns use Arrow's fixed-shape tensor type, so encoding wraps numpy
buffers and decoding returns read-only numpy views, both without copies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"
_VERSION_KEY = b"gdpo.schema_version"

REFERENCE_POLICY_VERSION = -1  # samples drawn from the frozen reference, not from a LoRA version


@dataclass(frozen=True, kw_only=True)
class RolloutGroups:
    """N groups of G samples from a rollout worker (SPEC section 3)."""

    group_id: tuple[str, ...]  # [N] unique per group, e.g. "rollout0-000042"
    image_id: tuple[str, ...]  # [N] the training image, a printable id (valid UTF-8: sr_data.scan.printable)
    data_index: np.ndarray  # [N] int64, the data-source index of the pair (the data position)
    seed: np.ndarray  # [N] int64, seeds the group's posterior sample and noises
    policy_version: np.ndarray  # [N] int64, adapter version that sampled; -1 = reference
    prompt: tuple[str, ...]  # [N]
    lr: np.ndarray  # [N, 3, H, W] uint8, LR already resized to the output size
    hr: np.ndarray  # [N, 3, H, W] uint8
    sr: np.ndarray  # [N, G, 3, H, W] float32 in [0, 1]
    latents: np.ndarray  # [N, G, 4, H/f, W/f] float32, z0 = re-encoded SR (scaled); f = 8 (SD), 4 (tiny)
    text_emb: np.ndarray  # [N, L, D] float32, the prompt's CLIP embedding
    generate_seconds: np.ndarray  # [N] float64, rollout wall time per group

    def __post_init__(self) -> None:
        n, g = self.sr.shape[:2]
        assert self.lr.shape == self.hr.shape == (n, *self.sr.shape[2:]), (self.lr.shape, self.sr.shape)
        assert self.latents.shape[:2] == (n, g), self.latents.shape
        assert len(self.group_id) == len(self.image_id) == len(self.prompt) == n

    @property
    def num_groups(self) -> int:
        return self.sr.shape[0]

    @property
    def group_size(self) -> int:
        return self.sr.shape[1]


@dataclass(frozen=True, kw_only=True)
class GroupRewards:
    """ARF scores of N groups (SPEC section 4), appended by the reward service."""

    metric_names: tuple[str, ...]  # M names, e.g. ("psnr_y", "musiq", "maniqa")
    metric_raw: np.ndarray  # [N, M, G] float32, as the metric reports it
    metric_norm: np.ndarray  # [N, M, G] float32, higher-is-better, min-max over the group
    rho_s: np.ndarray  # [N] float32, smooth proportion of the HR image
    rho_d: np.ndarray  # [N] float32, detail proportion
    reward: np.ndarray  # [N, G] float32, Eq. 7
    advantage: np.ndarray  # [N, G] float32, Eq. 8
    zero_range: np.ndarray  # [N] int32, metrics whose G values were all equal
    reward_seconds: np.ndarray  # [N] float64, scoring wall time per group


def _tensor(values: np.ndarray, dtype: type) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.shape[0] == 0:  # pyarrow refuses empty ndarrays (e.g. every group of a batch dropped)
        tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), values.shape[1:])
        return pa.ExtensionArray.from_storage(tensor_type, pa.array([], tensor_type.storage_type))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(values)


def _rollout_arrays(g: RolloutGroups) -> dict[str, pa.Array]:
    return {
        "group_id": pa.array(g.group_id, pa.string()),
        "image_id": pa.array(g.image_id, pa.string()),
        "data_index": pa.array(np.asarray(g.data_index, np.int64)),
        "seed": pa.array(np.asarray(g.seed, np.int64)),
        "policy_version": pa.array(np.asarray(g.policy_version, np.int64)),
        "prompt": pa.array(g.prompt, pa.string()),
        "lr": _tensor(g.lr, np.uint8),
        "hr": _tensor(g.hr, np.uint8),
        "sr": _tensor(g.sr, np.float32),
        "latents": _tensor(g.latents, np.float32),
        "text_emb": _tensor(g.text_emb, np.float32),
        "generate_seconds": pa.array(np.asarray(g.generate_seconds, np.float64)),
    }


def _reward_arrays(r: GroupRewards, n: int) -> dict[str, pa.Array]:
    return {
        "metric_names": pa.array([list(r.metric_names)] * n, pa.list_(pa.string())),
        "metric_raw": _tensor(r.metric_raw, np.float32),
        "metric_norm": _tensor(r.metric_norm, np.float32),
        "rho_s": pa.array(np.asarray(r.rho_s, np.float32)),
        "rho_d": pa.array(np.asarray(r.rho_d, np.float32)),
        "reward": _tensor(r.reward, np.float32),
        "advantage": _tensor(r.advantage, np.float32),
        "zero_range": pa.array(np.asarray(r.zero_range, np.int32)),
        "reward_seconds": pa.array(np.asarray(r.reward_seconds, np.float64)),
    }


ROLLOUT_COLUMNS = tuple(f.name for f in fields(RolloutGroups))
REWARD_COLUMNS = tuple(f.name for f in fields(GroupRewards))


def encode_rollout(groups: RolloutGroups) -> pa.RecordBatch:
    arrays = _rollout_arrays(groups)
    assert tuple(arrays) == ROLLOUT_COLUMNS
    return pa.RecordBatch.from_pydict(arrays, metadata={_VERSION_KEY: SCHEMA_VERSION.encode()})


def append_rewards(batch: pa.RecordBatch, rewards: GroupRewards) -> pa.RecordBatch:
    """The rollout batch with the reward columns added (row order unchanged)."""
    _check_version(batch)
    if any(name in batch.schema.names for name in REWARD_COLUMNS):
        raise ValueError("this batch already carries reward columns")
    arrays = {name: batch.column(name) for name in batch.schema.names}
    arrays.update(_reward_arrays(rewards, batch.num_rows))
    return pa.RecordBatch.from_pydict(arrays, metadata=batch.schema.metadata)


def is_scored(batch: pa.RecordBatch) -> bool:
    return all(name in batch.schema.names for name in REWARD_COLUMNS)


def decode_rollout(batch: pa.RecordBatch) -> RolloutGroups:
    _check_version(batch, ROLLOUT_COLUMNS)
    return RolloutGroups(**{name: _decode(batch.column(name)) for name in ROLLOUT_COLUMNS})


def decode_rewards(batch: pa.RecordBatch) -> GroupRewards:
    _check_version(batch, REWARD_COLUMNS)
    values = {name: _decode(batch.column(name)) for name in REWARD_COLUMNS}
    names = batch.column("metric_names")
    values["metric_names"] = tuple(names[0].as_py()) if len(names) else ()
    return GroupRewards(**values)


def select_rows(batch: pa.RecordBatch, keep: np.ndarray) -> pa.RecordBatch:
    """The rows where ``keep`` ([N] bool) is true, e.g. after group filtering."""
    return batch.filter(pa.array(np.asarray(keep, dtype=bool)))


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One batch from several with the same schema (copies the data once)."""
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _decode(column: pa.Array) -> object:
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    if pa.types.is_string(column.type):
        return tuple(column.to_pylist())
    return column.to_numpy(zero_copy_only=False)


def _check_version(batch: pa.RecordBatch, required: tuple[str, ...] = ()) -> None:
    version = (batch.schema.metadata or {}).get(_VERSION_KEY, b"").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(f"group record schema version {version or 'missing'!r}; this code reads {SCHEMA_VERSION!r}")
    missing = [name for name in required if name not in batch.schema.names]
    if missing:
        raise ValueError(f"group record lacks column(s) {missing}")

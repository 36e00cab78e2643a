"""The Arrow group record (common/records.py): every column of both record types, round-tripped.

Each column gets its own distinct values (the same-shaped ``lr``/``hr``, ``metric_raw``/``metric_norm``,
``reward``/``advantage``, ``rho_s``/``rho_d`` and the int64 columns differ everywhere), so a column
written to or read from the wrong name cannot pass.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pyarrow as pa
import pytest

from common.records import (
    REWARD_COLUMNS,
    ROLLOUT_COLUMNS,
    GroupRewards,
    RolloutGroups,
    append_rewards,
    concat,
    decode_rewards,
    decode_rollout,
    encode_rollout,
    is_scored,
    select_rows,
)

N, G, H, W = 3, 4, 16, 24  # H != W: a transposed image would not fit


def rollout_groups(seed: int = 0) -> RolloutGroups:
    rng = np.random.default_rng(seed)
    lr = rng.integers(0, 128, (N, 3, H, W), dtype=np.uint8)
    return RolloutGroups(
        group_id=tuple(f"grp-{seed}-{i}" for i in range(N)),
        image_id=tuple(f"img-{seed}-{i}.png" for i in range(N)),
        data_index=np.array([10, 11, 12], np.int64) + 100 * seed,
        seed=np.array([2**40 + 1, -5, 7], np.int64) + seed,
        policy_version=np.array([-1, 3, 4], np.int64),
        prompt=tuple(f"a photo {seed}-{i}, " for i in range(N)),
        lr=lr,
        hr=lr + 128,  # distinct from lr at every pixel
        sr=rng.random((N, G, 3, H, W), dtype=np.float32),
        latents=rng.standard_normal((N, G, 4, H // 8, W // 8), dtype=np.float32),
        text_emb=rng.standard_normal((N, 5, 8), dtype=np.float32),
        generate_seconds=np.array([0.25, 1.5, 3.75]) + seed,
    )


def group_rewards(seed: int = 0) -> GroupRewards:
    rng = np.random.default_rng(seed + 1000)
    raw = rng.random((N, 2, G), dtype=np.float32) + 10.0  # raw in [10, 11), normalised in [0, 1)
    reward = rng.random((N, G), dtype=np.float32)
    return GroupRewards(
        metric_names=("psnr_y", "musiq"),
        metric_raw=raw,
        metric_norm=rng.random((N, 2, G), dtype=np.float32),
        rho_s=np.array([0.25, 0.5, 0.875], np.float32),
        rho_d=np.array([0.75, 0.5, 0.125], np.float32) + np.float32(1.0),  # not 1 - rho_s: a swap must show
        reward=reward,
        advantage=reward - np.float32(2.0),
        zero_range=np.array([0, 1, 2], np.int32),
        reward_seconds=np.array([0.5, 0.125, 2.0]) + seed,
    )


def _ipc(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Through Arrow's IPC stream format, as a batch crossing a process boundary."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return pa.ipc.open_stream(sink.getvalue()).read_next_batch()


TRANSPORTS = {"in_memory": lambda b: b, "ipc": _ipc, "pickle": lambda b: pickle.loads(pickle.dumps(b, protocol=5))}


def assert_same_record(got: object, want: object) -> None:
    assert type(got) is type(want)
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray), field.name
            assert a.dtype == b.dtype and a.shape == b.shape, (field.name, a.dtype, b.dtype, a.shape, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=field.name)  # a copy of the same bytes: exact
        else:
            assert a == b, field.name


def test_test_data_has_distinct_columns() -> None:
    """Guard: same-shaped columns must differ, or a swap between them would go unseen."""
    g, r = rollout_groups(), group_rewards()
    pairs = [(g.lr, g.hr), (r.metric_raw, r.metric_norm), (r.reward, r.advantage), (r.rho_s, r.rho_d)]
    pairs += [(g.data_index, g.seed), (g.seed, g.policy_version), (g.data_index, g.policy_version)]
    for a, b in pairs:
        assert (a != b).all()
    assert len({*g.group_id, *g.image_id, *g.prompt}) == 3 * N


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rollout_record_round_trips_every_column(transport: str) -> None:
    groups = rollout_groups()
    batch = TRANSPORTS[transport](encode_rollout(groups))
    assert tuple(batch.schema.names) == ROLLOUT_COLUMNS
    assert {f.name for f in dataclasses.fields(RolloutGroups)} == set(ROLLOUT_COLUMNS)
    assert_same_record(decode_rollout(batch), groups)
    assert not is_scored(batch)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_scored_record_round_trips_every_column(transport: str) -> None:
    groups, rewards = rollout_groups(), group_rewards()
    batch = TRANSPORTS[transport](append_rewards(encode_rollout(groups), rewards))
    assert tuple(batch.schema.names) == ROLLOUT_COLUMNS + REWARD_COLUMNS
    assert is_scored(batch)
    assert_same_record(decode_rollout(batch), groups)  # the rollout columns survive the append
    assert_same_record(decode_rewards(batch), rewards)


def test_each_named_arrow_column_holds_that_field() -> None:
    """Column by column on the Arrow side too: encoder and decoder swapping alike would pass a round trip."""
    groups, rewards = rollout_groups(), group_rewards()
    batch = append_rewards(encode_rollout(groups), rewards)
    for record in (groups, rewards):
        for field in dataclasses.fields(record):
            column, want = batch.column(field.name), getattr(record, field.name)
            if field.name == "metric_names":
                assert column.to_pylist() == [list(want)] * N
            elif isinstance(want, tuple):
                assert tuple(column.to_pylist()) == want, field.name
            elif want.ndim > 1:
                got = column.to_numpy_ndarray()
                assert got.dtype == want.dtype, field.name
                np.testing.assert_array_equal(got, want, err_msg=field.name)
            else:
                got = column.to_numpy()
                assert got.dtype == want.dtype, field.name
                np.testing.assert_array_equal(got, want, err_msg=field.name)


def test_rows_stay_together_through_select_and_concat() -> None:
    first, second = rollout_groups(0), rollout_groups(1)
    scored = [append_rewards(encode_rollout(g), group_rewards(s)) for s, g in enumerate((first, second))]
    both = concat(scored)
    assert both.num_rows == 2 * N
    kept = select_rows(both, np.array([True, False, True, False, True, False]))
    groups, rewards = decode_rollout(kept), decode_rewards(kept)
    rows = [(first, 0), (first, 2), (second, 1)]
    assert groups.group_id == tuple(g.group_id[i] for g, i in rows)
    for name in ("lr", "hr", "sr", "latents", "text_emb", "seed", "data_index", "generate_seconds"):
        np.testing.assert_array_equal(getattr(groups, name), np.stack([getattr(g, name)[i] for g, i in rows]))
    want = [group_rewards(0), group_rewards(1)]
    for name in ("metric_raw", "metric_norm", "reward", "advantage", "rho_s", "rho_d", "zero_range"):
        expected = np.stack([getattr(want[k], name)[i] for k, i in ((0, 0), (0, 2), (1, 1))])
        np.testing.assert_array_equal(getattr(rewards, name), expected)


def test_an_empty_batch_round_trips() -> None:
    batch = append_rewards(encode_rollout(rollout_groups()), group_rewards())
    empty = select_rows(batch, np.zeros(N, dtype=bool))
    groups, rewards = decode_rollout(empty), decode_rewards(empty)
    assert groups.num_groups == 0 and groups.lr.shape == (0, 3, H, W) and groups.sr.shape == (0, G, 3, H, W)
    assert rewards.metric_names == () and rewards.reward.shape == (0, G)


def test_version_and_missing_columns_are_refused() -> None:
    batch = encode_rollout(rollout_groups())
    with pytest.raises(ValueError, match="schema version"):
        decode_rollout(batch.replace_schema_metadata({}))
    with pytest.raises(ValueError, match="lacks column"):
        decode_rewards(batch)
    with pytest.raises(ValueError, match="already carries"):
        append_rewards(append_rewards(batch, group_rewards()), group_rewards())

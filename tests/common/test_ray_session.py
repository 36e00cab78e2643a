"""Placement-group waits print progress and end with a clear error naming the pool (a real local Ray)."""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from common.ray_session import PoolRequest, ResourceError, wait_placement_group


@pytest.mark.usefixtures("ray_session")
def test_an_impossible_reservation_times_out_naming_the_pool(capsys):
    pool = PoolRequest("learner", 2, {"CPU": 64.0})
    pg = placement_group([dict(pool.per_actor)] * pool.count, strategy="PACK")
    try:
        with pytest.raises(ResourceError, match=r"^pool 'learner' \(2 x \{CPU: 64\}\) got no resources in 2 s; free "):
            wait_placement_group(pg, pool, timeout_s=2.0, every_s=0.5)
    finally:
        remove_placement_group(pg)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ray: waiting for pool")]
    assert progress and progress[0].startswith("ray: waiting for pool 'learner' (2 x {CPU: 64}): ")


@pytest.mark.usefixtures("ray_session")
def test_a_possible_reservation_returns_quietly(capsys):
    pool = PoolRequest("rollout", 1, {"CPU": 1.0})
    pg = placement_group([dict(pool.per_actor)], strategy="PACK")
    try:
        wait_placement_group(pg, pool, timeout_s=60.0)
        assert ray.get(pg.ready(), timeout=1) is not None
    finally:
        remove_placement_group(pg)
    assert "waiting for pool" not in capsys.readouterr().out

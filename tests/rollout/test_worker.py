"""RolloutWorker without Ray: records, determinism, reference vs policy sampling, adapter pushes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.adapter_sync import pack
from common.naosd import ModelConfig, lora_parameters
from common.records import REFERENCE_POLICY_VERSION, decode_rollout
from common.weights import adapter_state_dict
from rollout.worker import RolloutConfig, RolloutWorker, StaleWeightsError, group_seed
from sr_data.scan import NoUsableImages
from sr_data.source import DataConfig
from tests.sr_data.conftest import photo, save

DATA = DataConfig(crop_size=32)


def _worker(sample_from: str = "reference", name: str = "r0") -> RolloutWorker:
    return RolloutWorker(ModelConfig(), RolloutConfig(group_size=3, sample_from=sample_from), DATA, name)


def _trained_adapter(worker: RolloutWorker, version: int):
    state = adapter_state_dict(worker.model.unet)
    gen = torch.Generator().manual_seed(version)
    return pack(version, {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()})


@pytest.fixture(scope="module")
def worker() -> RolloutWorker:
    return _worker()


def test_generate_fills_the_record(worker):
    groups = decode_rollout(worker.generate([0, 1]))
    assert groups.sr.shape == (2, 3, 3, 32, 32) and groups.sr.dtype == np.float32
    assert groups.sr.min() >= 0 and groups.sr.max() <= 1
    assert groups.latents.shape == (2, 3, 4, 8, 8) and groups.text_emb.shape == (2, 77, 32)
    assert groups.lr.shape == groups.hr.shape == (2, 3, 32, 32) and groups.lr.dtype == np.uint8
    assert groups.data_index.tolist() == [0, 1] and groups.group_id == ("r0-000000000", "r0-000000001")
    assert groups.seed.tolist() == [group_seed(0, 0), group_seed(0, 1)]
    assert (groups.policy_version == REFERENCE_POLICY_VERSION).all()
    assert np.abs(groups.sr[0, 0] - groups.sr[0, 1]).max() > 1e-4  # fresh noise per member


def test_a_group_depends_on_its_index_not_on_the_worker_or_batch(worker):
    other = _worker(name="r1")
    alone = decode_rollout(other.generate([1]))
    together = decode_rollout(worker.generate([0, 1]))
    np.testing.assert_array_equal(alone.sr[0], together.sr[1])
    np.testing.assert_array_equal(alone.latents[0], together.latents[1])


def test_reference_mode_ignores_the_pushed_adapter_policy_mode_uses_it():
    reference, policy = _worker("reference"), _worker("policy")
    before = {m: decode_rollout(w.generate([2])).sr for m, w in (("ref", reference), ("pol", policy))}
    np.testing.assert_array_equal(before["ref"], before["pol"])  # fresh adapter: policy == reference
    for w in (reference, policy):
        assert w.set_adapter(_trained_adapter(w, version=3)) == 3
    after_ref, after_pol = decode_rollout(reference.generate([2])), decode_rollout(policy.generate([2]))
    np.testing.assert_array_equal(after_ref.sr, before["ref"])
    assert np.abs(after_pol.sr - before["pol"]).max() > 1e-4
    assert after_pol.policy_version.tolist() == [3]
    applied = lora_parameters(policy.model.unet)
    sent = _trained_adapter(policy, version=3).tensors
    assert all(torch.equal(applied[k], sent[k]) for k in sent)  # applied in place, bit for bit


def test_policy_mode_refuses_stale_weights_and_old_pushes():
    w = _worker("policy")
    w.set_adapter(_trained_adapter(w, version=2))
    with pytest.raises(StaleWeightsError, match="needs >= v3"):
        w.generate([0], min_version=3)
    assert w.set_adapter(_trained_adapter(w, version=1)) == 2  # a late, older push is ignored
    bad = dataclasses.replace(_trained_adapter(w, version=5), digest="0" * 64)
    with pytest.raises(ValueError, match="digest mismatch"):
        w.set_adapter(bad)
    assert w.version == 2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="group_size"):
        RolloutConfig(group_size=1)
    with pytest.raises(ValueError, match="max_inflight_per_worker"):
        RolloutConfig(max_inflight_per_worker=0)


def _truncated(path: Path) -> None:
    """A JPEG cut in half: the header (size) reads, the pixels do not."""
    save(path, photo(96, 96, seed=3))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _hostile_folder(root: Path) -> Path:
    """Two good images (one under a name that is not valid UTF-8), a truncated one, a transparent one, a 1x1."""
    save(root / "good.png", photo(48, 48, seed=1))
    save(root / os.fsdecode(b"bad\xff.png"), photo(48, 48, seed=2))
    _truncated(root / "cut.jpg")
    rgba = np.dstack([photo(48, 48, seed=4), np.full((48, 48), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    save(root / "holes.png", rgba)
    save(root / "dot.png", photo(1, 1, seed=5))
    return root


def test_bad_files_are_skipped_and_reported_once_with_printable_ids(tmp_path):
    data = DataConfig(hr_dir=str(_hostile_folder(tmp_path)), crop_size=32, min_side=32)
    w = RolloutWorker(ModelConfig(), RolloutConfig(group_size=2), data, "r0")
    summary = w.ready()
    assert summary.found == 5 and summary.escaped_names == 1
    assert summary.by_reason() == {"too_small": 1}  # the 1x1, at indexing; the rest only shows when decoded
    reported, ids = list(summary.skipped), set()
    for start in range(0, 8, 2):  # two epochs of the four indexed images
        result = w.generate_reported([start, start + 1])
        reported += result.skipped
        ids |= set(decode_rollout(result.batch).image_id)  # an Arrow string column: valid UTF-8 only
    assert ids == {"good.png", "bad\\xff.png"}
    assert sorted((s.file_id, s.reason) for s in reported) == [
        ("cut.jpg", "unreadable"), ("dot.png", "too_small"), ("holes.png", "transparent"),
    ]  # fmt: skip


def test_data_without_a_usable_image_fails_ready(tmp_path):
    _truncated(tmp_path / "cut.jpg")
    w = RolloutWorker(ModelConfig(), RolloutConfig(group_size=2), DataConfig(hr_dir=str(tmp_path), crop_size=32), "r0")
    with pytest.raises(NoUsableImages, match="no readable image left"):
        w.ready()

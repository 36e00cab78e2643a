"""The rollout worker: G NAOSD samples per LR image, as Arrow group records (SPEC section 3).

A plain class, made a Ray actor where the driver creates it.  It samples from
the frozen reference (the UNet with the ``gdpo`` adapter off) by default, or
from the current policy; either way it keeps the latest adapter the learner
pushed, applied in place, and stamps every group with the version it used.

Bad data is not a worker failure.  A file found unusable while sampling
(truncated, transparent, ...) is skipped by the data source, which draws the
next image instead; the actor pool's call (:meth:`RolloutWorker.generate_reported`)
reports each such file once, so the driver can count and log it.  Only data
that holds nothing usable at all raises (:class:`sr_data.scan.NoUsableImages`,
already in :meth:`RolloutWorker.ready`): that is systematic, and a fresh worker
would meet it again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from common.adapter_sync import AdapterWeights, apply_to
from common.naosd import ModelConfig, adapter_disabled
from common.records import REFERENCE_POLICY_VERSION, RolloutGroups, encode_rollout
from common.tiny import model_notice
from common.weights import build_naosd
from sr_data.scan import DataSummary, SkippedFile
from sr_data.source import DataConfig, PairSource


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    group_size: int = 6  # G
    groups_per_call: int = 1  # images per generate() call, i.e. per Arrow batch
    sample_from: Literal["reference", "policy"] = "reference"
    max_staleness: int = 1  # policy mode: how many adapter versions behind a sample may be
    max_inflight_per_worker: int = 2  # bounded queue of calls ahead of the learner, per worker
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are group-relative), got {self.group_size}")
        for name in ("groups_per_call", "max_inflight_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


@dataclass(frozen=True)
class RolloutResult:
    """What one actor-pool call returns: the groups, and the files found unusable while sampling them."""

    batch: pa.RecordBatch  # the group record (common/records.py)
    skipped: tuple[SkippedFile, ...]  # each reported once per worker; ids are valid UTF-8


class StaleWeightsError(RuntimeError):
    """A policy-mode call asked for newer weights than this worker holds."""


def group_seed(run_seed: int, index: int) -> int:
    """The seed of the group drawn for data index ``index``: independent of which worker draws it."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class RolloutWorker:
    def __init__(
        self, model_config: ModelConfig, config: RolloutConfig, data_config: DataConfig, worker_id: str
    ) -> None:
        self.config, self.worker_id = config, worker_id
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if notice := model_notice(model_config.source, model_config.naosd_path):
            print(f"[{worker_id}] {notice}", flush=True)
        self.model = build_naosd(model_config, device=device)
        self.source = PairSource(data_config)
        self.version = 0  # the fresh adapter (B = 0) is version 0: the policy equals the reference
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._reported = 0  # files of self.source.skipped already reported

    def ready(self) -> DataSummary:
        """What the data source indexed, once one image has decoded (raises NoUsableImages if none does)."""
        self.source.probe()
        summary = self.source.summary()
        self._reported = len(summary.skipped)  # reported here; generate_reported reports what comes after
        return summary

    def set_adapter(self, weights: AdapterWeights) -> int:
        """Apply a pushed adapter in place (digest-checked); returns the version now held."""
        if weights.version < self.version:
            return self.version  # a late push of an older version must not roll the policy back
        apply_to(self.model.unet, weights)
        self.version = weights.version
        return self.version

    def generate(self, indices: Sequence[int], min_version: int = 0) -> pa.RecordBatch:
        """One group per data index: ``[N]`` rows, each with G samples."""
        if self.config.sample_from == "policy" and self.version < min_version:
            raise StaleWeightsError(f"{self.worker_id} holds adapter v{self.version}, call needs >= v{min_version}")
        pairs = [self.source.sample(i) for i in indices]
        seeds = np.array([group_seed(self.config.seed, p.index) for p in pairs], np.int64)
        start = time.perf_counter()
        columns = [self._group(pair.lr, pair.prompt, int(seed)) for pair, seed in zip(pairs, seeds, strict=True)]
        seconds = (time.perf_counter() - start) / len(pairs)
        sr, latents, emb = (np.stack(c) for c in zip(*columns, strict=True))
        reference = self.config.sample_from == "reference"
        groups = RolloutGroups(
            group_id=tuple(f"{self.worker_id}-{p.index:09d}" for p in pairs),
            image_id=tuple(p.image_id for p in pairs),
            data_index=np.array([p.index for p in pairs], np.int64),
            seed=seeds,
            policy_version=np.full(len(pairs), REFERENCE_POLICY_VERSION if reference else self.version, np.int64),
            prompt=tuple(p.prompt for p in pairs),
            lr=np.stack([p.lr for p in pairs]),
            hr=np.stack([p.hr for p in pairs]),
            sr=sr,
            latents=latents,
            text_emb=emb,
            generate_seconds=np.full(len(pairs), seconds),
        )
        return encode_rollout(groups)

    def generate_reported(self, indices: Sequence[int], min_version: int = 0) -> RolloutResult:
        """:meth:`generate`, plus the files this worker found unusable since its last report."""
        batch = self.generate(indices, min_version)
        skipped = tuple(self.source.skipped.values())[self._reported :]
        self._reported += len(skipped)
        return RolloutResult(batch, skipped)

    @torch.no_grad()
    def _group(self, lr_uint8: np.ndarray, prompt: str, seed: int) -> tuple[np.ndarray, ...]:
        """``sr [G, 3, H, W]`` in [0, 1], ``z0 [G, 4, h, w]``, ``text_emb [L, D]`` for one image."""
        model = self.model
        device = model.alphas_cumprod.device
        generator = torch.Generator(device=device).manual_seed(seed)
        lr = torch.from_numpy(lr_uint8).to(device).float().div(127.5).sub(1).unsqueeze(0)
        emb = self._embed(prompt)
        sampler = adapter_disabled(model.unet) if self.config.sample_from == "reference" else nullcontext()
        with sampler:
            sr = model.sample_group(lr, emb, group_size=self.config.group_size, generator=generator)[0]
        # SPEC section 5: z0 is the decoded, clamped sample re-encoded (a posterior sample).
        z0 = model.encode(sr, generator).float()
        return (sr.add(1).div(2).cpu().numpy(), z0.cpu().numpy(), emb[0].float().cpu().numpy())

    def _embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.model.encode_prompts([prompt])
        return self._prompt_cache[prompt]

"""One data-parallel learner rank: the GDPO update of SPEC section 5 under DeepSpeed.

This is the only module of the repository that imports DeepSpeed: other ranks
(NAOSD pre-training, :mod:`learner.pretrain_rank`) get their engine and their
process group from :func:`initialize` and :func:`init_distributed` here.  A
:class:`LearnerRank` owns the policy UNet (the reference is the same UNet with
its adapter off), a DeepSpeed engine over the LoRA parameters only, and the
rank's place in the ``torch.distributed`` group.  It is a plain class, so tests
drive it without Ray; :mod:`learner.group` hosts one per Ray actor.

One ``train_step`` is one optimiser step on the global batch: each rank gets an
equal shard of the groups, splits it into micro-batches of
``micro_batch_groups`` groups, scales each micro-batch loss by its share of the
shard, and lets DeepSpeed average the gradients over ranks at the (manually
set) accumulation boundary.  The result is the gradient of the mean loss over
all groups of the batch, whatever the world size and micro-batch size.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from deepspeed.constants import default_pg_timeout
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor

from common import checkpoint_files, checkpoint_store
from common.adapter_folder import read_adapter_metadata
from common.adapter_sync import AdapterWeights, digest, pack
from common.naosd import ModelConfig, lora_parameters
from common.records import decode_rewards, decode_rollout
from common.weights import adapter_state_dict, build_policy_unet, save_adapter
from learner.config import LearnerConfig, deepspeed_config
from learner.objectives import ObjectiveInputs, objective_loss
from learner.rank_checkpoint import save_atomically
from learner.rendezvous import rendezvous_store
from learner.reward_feedback_model import build_reward_feedback

ADAPTER_DIR = "adapter"  # <checkpoint>/adapter: a peft + diffusers adapter folder (common.adapter_folder)
DEEPSPEED_DIR = "deepspeed"  # <checkpoint>/deepspeed: DeepSpeed's engine and optimizer state
_CLIENT_KEY = "gdpo_client_state"  # our key inside DeepSpeed's client state, clear of DeepSpeed's own keys
# The only non-builtin classes DeepSpeed 0.19 pickles into its optimizer state (ZeRO 1-3, fp16/bf16):
# plain attribute records and an int Enum, none with custom unpickling code.
_DEEPSPEED_STATE_CLASSES = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def loss_noise(seed: int, group_seeds: np.ndarray, step: int, shape: tuple[int, ...]) -> Tensor:
    """The fresh ``e_i`` of SPEC section 5 for each group: ``[n, *shape]`` float32 on CPU.

    Drawn from (learner seed, the group's own seed, step) only, so a group gets
    the same noise on whichever rank and in whichever micro-batch it lands,
    and a resumed run draws what the uninterrupted one would have drawn.
    """
    noises = []
    for group_seed in np.asarray(group_seeds, dtype=np.int64):
        # SeedSequence mixes the three keys; group seeds may be negative int64, hence the modulo.
        words = np.random.SeedSequence([seed, int(group_seed) % 2**64, step]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
        noises.append(torch.randn(shape, generator=generator))
    return torch.stack(noises)


class LearnerRank:
    """One rank of the learner: policy UNet + DeepSpeed engine + process-group membership."""

    def __init__(  # noqa: PLR0917 - the positional signature is the documented contract
        self,
        model_config: ModelConfig,
        learner_config: LearnerConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
    ) -> None:
        """Join the process group (blocks until all ``world_size`` ranks join) and build the engine."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.config, self.rank, self.world_size = learner_config, rank, world_size
        self.model_config = model_config  # recorded with the saved adapter, so it can be exported alone
        init_distributed(rank, world_size, master_addr, master_port)
        torch.manual_seed(learner_config.seed)  # the LoRA init (DeepSpeed then broadcasts rank 0's anyway)
        unet, alphas_cumprod = build_policy_unet(model_config)
        params = list(lora_parameters(unet).values())
        optimizer = torch.optim.AdamW(
            params,
            lr=learner_config.lr,
            betas=learner_config.betas,
            eps=learner_config.eps,
            weight_decay=learner_config.weight_decay,
        )
        self.engine = initialize(unet, optimizer, params, deepspeed_config(learner_config))
        self.engine.train()
        self.alphas_cumprod = alphas_cumprod.to(self.engine.device)  # [1000]
        # RFSR decodes through the VAE and scores with a metric; the other objectives need only the UNet.
        self.feedback = None
        if learner_config.objective == "reward_feedback":
            self.feedback = build_reward_feedback(model_config, learner_config.reward_feedback, self.engine.device)

    @property
    def unet(self) -> torch.nn.Module:
        """The policy UNet (DeepSpeed's module; with the adapter off it is the reference)."""
        return self.engine.module

    @property
    def step(self) -> int:
        """Optimiser steps taken (restored by :meth:`load_checkpoint`)."""
        return int(self.engine.global_steps)

    def train_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        """One optimiser step on this rank's shard of a scored batch; returns this rank's stats.

        Every rank of the group must call this with a shard of the same size
        (DeepSpeed averages gradients over ranks, which equals the full-batch
        mean only when the shards are equal).
        """
        inputs = self._shard_tensors(batch)
        n, size = inputs.num_groups, self.config.micro_batch_groups
        sums: dict[str, float] = {}
        for start in range(0, n, size):
            self.engine.set_gradient_accumulation_boundary(start + size >= n)
            micro = self._micro_step(inputs.part(slice(start, start + size)), shard_size=n)
            for key, value in micro.items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norm = self._step()
        applied = self.engine.was_step_applied()
        # Skipped for a non-finite loss or gradient (an fp16 loss-scale overflow skip is DeepSpeed's routine).
        nonfinite = not math.isfinite(sums.get("loss", 0.0)) or (not applied and self.config.precision != "fp16")
        return {
            **{key: value / n for key, value in sums.items()},
            "grad_norm": grad_norm,
            "step": float(self.step),
            "num_groups": float(n),
            "step_applied": float(applied),
            "nonfinite": float(nonfinite),
        }

    def _shard_tensors(self, batch: pa.RecordBatch) -> ObjectiveInputs:
        """latents ``[n, G, 4, h, w]``, loss noise (same shape), text ``[n, L, D]``, advantages ``[n, G]``, ...; CPU."""
        groups, rewards = decode_rollout(batch), decode_rewards(batch)
        if groups.num_groups == 0:
            raise ValueError("train_step needs at least one group")
        latents = torch.tensor(groups.latents, dtype=torch.float32)  # a copy: Arrow buffers are read-only
        noise = loss_noise(self.config.seed, groups.seed, self.step, tuple(latents.shape[1:]))
        return ObjectiveInputs(
            latents=latents,
            noise=noise,
            text_emb=torch.tensor(groups.text_emb, dtype=torch.float32),
            advantages=torch.tensor(rewards.advantage, dtype=torch.float32),
            rewards=torch.tensor(rewards.reward, dtype=torch.float32),
            lr=torch.tensor(groups.lr),
            hr=torch.tensor(groups.hr),
        )

    def _micro_step(self, inputs: ObjectiveInputs, *, shard_size: int) -> dict[str, float]:
        """Forward + backward of ``k`` groups (``learner.objective``); returns stat sums over them."""
        out = objective_loss(
            # The engine, not engine.module: DeepSpeed does its ZeRO micro-step bookkeeping in
            # engine.forward; calling the module directly made ZeRO-3 keep only the last
            # micro-batch's gradient.  The engine forwards disable_adapters() to the UNet.
            self.engine,
            inputs.to(self.engine.device),
            alphas_cumprod=self.alphas_cumprod,
            config=self.config,
            feedback=self.feedback,
        )
        # Weighted by the micro-batch's share, the accumulated gradient is that of the shard mean.
        self.engine.backward(_nan_unless_finite(out.loss * (inputs.num_groups / shard_size)))
        return out.stats

    def _step(self) -> float:
        """``engine.step()``, skipped when the gradient is not finite; returns the global norm before clipping.

        ZeRO and DeepSpeed's fp16/bf16 optimisers measure the norm and skip a non-finite step
        themselves (``was_step_applied()`` is then False); a plain torch optimizer at stage 0
        does neither, so measure the (already all-reduced, so the same on every rank) gradients
        and skip the update here.  A skipped step still counts in ``global_steps``.
        """
        own = None if hasattr(self.engine.optimizer, "_global_grad_norm") else self._lora_grad_norm()
        if own is not None and not math.isfinite(own):
            with _skipped_update(self.engine.optimizer):
                self.engine.step()
        else:
            self.engine.step()
        reported = self.engine.get_global_grad_norm()
        norm = float(own if reported is None else reported)
        assert math.isfinite(norm) or not self.engine.was_step_applied(), f"a step with gradient norm {norm} ran"
        return norm

    def _lora_grad_norm(self) -> float:
        grads = [p.grad.detach().float().reshape(-1) for p in lora_parameters(self.unet).values() if p.grad is not None]
        return float(torch.cat(grads).norm()) if grads else 0.0

    @contextlib.contextmanager
    def _full_adapter(self) -> Iterator[None]:
        """Under ZeRO-3 the LoRA tensors are partitioned: gather them (a collective) while inside."""
        if self.config.zero_stage == 3:
            params = list(lora_parameters(self.unet).values())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def adapter_weights(self, version: int | None = None) -> AdapterWeights:
        """The current adapter as CPU float32 tensors; ``version`` defaults to :attr:`step`.

        A collective under ZeRO-3: call it on every rank.
        """
        with self._full_adapter():
            state = adapter_state_dict(self.unet)
        return pack(self.step if version is None else version, state)

    def save_checkpoint(self, root: str | Path, client_state: dict[str, Any], *, keep: int = 0) -> str:
        """Write ``<root>/checkpoint-<step>/`` atomically (a collective: every rank calls it); returns it.

        Every rank writes its DeepSpeed state and rank 0 the adapter into
        ``checkpoint-<step>.tmp``; once all are done rank 0 seals it
        (:func:`common.checkpoint_files.commit`: manifest, rename, ``latest``, keep the newest
        ``keep``).  ``client_state`` (data position, ...) comes back from :meth:`load_checkpoint`;
        it is read back with ``weights_only=True``, so keep it to plain Python values and
        tensors.  ``root`` is a folder shared by all ranks or a run-storage URI
        (:func:`learner.rank_checkpoint.save_atomically`).  A non-finite adapter is never written.
        """

        def write(staging: Path) -> None:
            with self._full_adapter():  # a collective under ZeRO-3: every rank enters, rank 0 writes
                if self.rank == 0:
                    state = adapter_state_dict(self.unet)
                    if bad := [name for name, t in state.items() if not bool(torch.isfinite(t).all())]:
                        raise RuntimeError(f"refusing to checkpoint a non-finite adapter: {bad[:3]} ...")
                    extra = {"step": self.step, "digest": digest(state)}
                    save_adapter(self.unet, staging / ADAPTER_DIR, model=self.model_config, extra=extra)
            self.engine.save_checkpoint(
                str(staging / DEEPSPEED_DIR),
                tag=_tag(self.step),
                client_state={_CLIENT_KEY: dict(client_state)},
                exclude_frozen_parameters=True,  # the frozen base is rebuilt from its source, not checkpointed
            )

        return save_atomically(root, self.step, self.rank, write, keep=keep)

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Resume from one ``checkpoint-<step>/``: adapter, optimizer state and step; returns the client state.

        The folder's manifest is verified before anything in it is opened, and DeepSpeed's
        files are unpickled with ``weights_only=True``: a :class:`~common.checkpoint_files.CheckpointError`
        (a ValueError) for a torn, changed or unsafe checkpoint, with nothing of it executed.
        """
        with checkpoint_store.local_copy(directory) as local:  # a URI is downloaded to this node first
            return self._load_checkpoint(local)

    def _load_checkpoint(self, directory: Path) -> dict[str, Any]:
        checkpoint_files.verify(directory)
        try:
            meta = read_adapter_metadata(directory / ADAPTER_DIR)
        except ValueError as err:
            raise ValueError(f"{directory} is not a learner checkpoint: {err}") from None
        path, states = load_deepspeed_state(self.engine, directory / DEEPSPEED_DIR, int(meta.get("step", -1)))
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint under {directory / DEEPSPEED_DIR}")
        weights = self.adapter_weights()
        # A non-strict load would skip a LoRA tensor silently; the adapter digest catches that.
        if meta.get("step") != self.step or meta.get("digest") != weights.digest:
            raise ValueError(
                f"checkpoint {directory}: DeepSpeed state (step {self.step}, digest {weights.digest[:12]}) does not "
                f"match the saved adapter (step {meta.get('step')}, digest {str(meta.get('digest'))[:12]})"
            )
        return dict((states or {}).get(_CLIENT_KEY, {}))


def initialize(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], config: dict[str, Any]
) -> Any:
    """A DeepSpeed engine over ``module`` stepping ``optimizer`` on ``params`` (call after :func:`init_distributed`)."""
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=params, config=config)
    assert type(engine.checkpoint_engine) is TorchCheckpointEngine, engine.checkpoint_engine  # what we replace
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(engine._config)
    return engine


class _WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19's own engine reads with ``weights_only=False``, which runs whatever code a
    pickle names.  This one reads tensors, containers, primitives and
    ``_DEEPSPEED_STATE_CLASSES`` only, and raises ``pickle.UnpicklingError`` for anything else.
    Every DeepSpeed read of a checkpoint (model states, ZeRO optimizer shards) goes through it.
    """

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(list(_DEEPSPEED_STATE_CLASSES)):
            return torch.load(path, map_location=map_location, weights_only=True)


def load_deepspeed_state(engine: Any, directory: Path, step: int) -> tuple[str | None, dict[str, Any] | None]:
    """``engine.load_checkpoint`` of tag ``step`` under ``directory`` (weights only; the caller verified the folder).

    A pickle naming anything but tensors, containers and DeepSpeed's own records is a
    :class:`~common.checkpoint_files.CheckpointError`; nothing in it runs.
    """
    try:
        return engine.load_checkpoint(
            str(directory),
            tag=_tag(step),
            load_module_strict=False,  # the frozen base was excluded on save
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    except pickle.UnpicklingError as err:
        raise checkpoint_files.CheckpointError(f"{directory}: refused to unpickle DeepSpeed state: {err}") from None


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _nan_unless_finite(loss: Tensor) -> Tensor:
    """``loss``, or ``loss * nan`` when it is not finite.

    An infinite loss can have a finite gradient (``-log sigmoid(x)`` has slope -1 as x -> -inf);
    made NaN, it poisons the gradient, so the one gradient check after the all-reduce
    (:meth:`LearnerRank._step`, or DeepSpeed's own) skips the step on every rank alike.
    """
    return loss if bool(torch.isfinite(loss.detach())) else loss * float("nan")


@contextlib.contextmanager
def _skipped_update(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Make the next ``engine.step()`` DeepSpeed's skipped step (as after an fp16 overflow).

    ``optimizer.step`` does nothing and ``optimizer.overflow`` is set, so the engine clears the
    gradients, counts the step in ``global_steps`` and ``skipped_steps`` and reports
    ``was_step_applied() == False``; the weights and Adam's moments stay as they were.
    """
    optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.step, optimizer.overflow


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the ``torch.distributed`` group: gloo on CPU, NCCL on CUDA (one rank per process).

    Rank 0 serves the rendezvous store on ``master_addr`` only.  ``env://`` (DeepSpeed's default) would let
    the ``TCPStore`` bind every interface, so the group is built here from a store whose listening socket
    this function binds, and DeepSpeed adopts the initialised group.
    """
    if dist.is_initialized():
        # A second LearnerRank in the same process (tests) reuses the group it already joined.
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}; "
                f"cannot become rank {rank} of {world_size}"
            )
        return
    # One rank per process, and under Ray a rank sees only its own GPU, hence LOCAL_RANK 0.
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = default_pg_timeout  # DeepSpeed's (env DEEPSPEED_TIMEOUT, minutes), for the store and the group
    store = rendezvous_store(rank, world_size, master_addr, master_port, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


"""Moving the learner's ``gdpo`` adapter to the rollout workers.

The learner packs its adapter tensors into an :class:`AdapterWeights` (a
version number and a content digest travel with them); a rollout worker calls
:func:`apply_to`, which checks the digest and copies the tensors into its UNet
in place, so no model is rebuilt and no base weight moves.  This module imports
neither Ray nor DeepSpeed: the transport is the caller's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.weights import load_adapter_state_dict


@dataclass(frozen=True)
class AdapterWeights:
    """One version of the adapter, as it crosses process boundaries."""

    version: int  # learner step that produced it (monotonic)
    digest: str  # sha256 hex of the tensors, see :func:`digest`
    nbytes: int  # total tensor bytes (what the transport moves)
    # name -> LoRA tensor, CPU and contiguous: lora_A ``[r, in(, k, k)]``, lora_B ``[out, r(, 1, 1)]``
    tensors: dict[str, Tensor]


def digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in sorted name order.

    Dtype and shape are hashed too so that a reinterpretation of the same bytes
    (e.g. a transposed or re-typed tensor) cannot pass as the same adapter.
    """
    hasher = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        # A uint8 view hashes any dtype (numpy has no bfloat16) without a copy.
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def pack(version: int, state: Mapping[str, Tensor]) -> AdapterWeights:
    """Wrap adapter tensors (e.g. ``adapter_state_dict(unet)``) with their version and digest."""
    if version < 0:
        raise ValueError(f"adapter version must be >= 0, got {version}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(state.items())}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return AdapterWeights(version=version, digest=digest(tensors), nbytes=nbytes, tensors=tensors)


def verify(weights: AdapterWeights) -> None:
    """Raise ``ValueError`` when the tensors are not the ones the digest was computed on."""
    actual = digest(weights.tensors)
    if actual != weights.digest:
        raise ValueError(
            f"adapter version {weights.version}: digest mismatch (got {actual[:12]}, expected "
            f"{weights.digest[:12]}); the tensors were corrupted or altered in transit"
        )


def apply_to(unet: nn.Module, weights: AdapterWeights) -> None:
    """Verify ``weights`` and copy them into ``unet``'s ``gdpo`` adapter in place.

    Names and shapes are checked by ``load_adapter_state_dict`` before anything
    is written, so a bad adapter leaves the UNet unchanged.
    """
    verify(weights)
    load_adapter_state_dict(unet, weights.tensors)

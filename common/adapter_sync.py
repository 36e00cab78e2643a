"""Moving the learner's ``gdpo`` adapter to the rollout workers.

The learner packs its adapter tensors into an :class:`AdapterWeights` (a
version number and a content digest travel with them); a rollout worker calls
:func:`apply_to`, which checks the digest and copies the tensors into its UNet
in place, so no model is rebuilt and no base weight moves.  This module imports
neither Ray nor DeepSpeed (the transport is the caller's), and only torch at
import time: unpickling or verifying an adapter does not pull in diffusers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

_ALIGN = 64  # byte alignment of each tensor in the flat transport buffer (dtype views need it)


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==; compare digests
class AdapterWeights:
    """One version of the adapter, as it crosses process boundaries."""

    version: int  # learner step that produced it (monotonic)
    digest: str  # sha256 hex of the tensors, see :func:`digest`
    nbytes: int  # total tensor bytes (what the transport moves)
    # name -> LoRA tensor, CPU and contiguous: lora_A ``[r, in(, k, k)]``, lora_B ``[out, r(, 1, 1)]``
    tensors: dict[str, Tensor]

    def __reduce__(self) -> tuple:
        # Pickled as one flat byte array: Ray ships a numpy array out-of-band without copying it
        # through pickle, whereas ~500 torch tensors pickle one by one (measured for the SD 2.1
        # adapter's 516 tensors: ~130 ms per put and per get, against ~25 ms and <1 ms plus one copy).
        layout, flat = _flatten(self.tensors)
        return _rebuild, (self.version, self.digest, self.nbytes, layout, flat)


def _flatten(tensors: Mapping[str, Tensor]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], np.ndarray]:
    """All tensors' bytes in one uint8 array ``[total]``; layout rows are (name, dtype, shape, byte offset)."""
    layout, offset = [], 0
    for name, tensor in tensors.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        layout.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
        offset += tensor.numel() * tensor.element_size()
    flat = np.empty(offset, dtype=np.uint8)
    for (_, _, _, start), tensor in zip(layout, tensors.values(), strict=True):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        flat[start : start + data.size] = data
    return layout, flat


def _rebuild(
    version: int, digest_hex: str, nbytes: int, layout: list[tuple[str, str, tuple[int, ...], int]], flat: np.ndarray
) -> AdapterWeights:
    """Inverse of :func:`_flatten`: tensors are views into one private, writable copy of ``flat``."""
    data = torch.from_numpy(np.array(flat, copy=True))  # Ray hands out read-only object-store memory
    tensors = {}
    for name, dtype_name, shape, start in layout:
        dtype = getattr(torch, dtype_name)
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        tensors[name] = data[start : start + size].view(dtype).reshape(shape)
    return AdapterWeights(version=version, digest=digest_hex, nbytes=nbytes, tensors=tensors)


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
    from common.weights import load_adapter_state_dict  # diffusers import (~20 s cold) only where a UNet is

    verify(weights)
    load_adapter_state_dict(unet, weights.tensors)

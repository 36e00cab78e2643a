"""AdapterWeights: the digest, packing, and applying an adapter in place with a check."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from common.adapter_sync import AdapterWeights, apply_to, digest, pack, verify
from common.naosd import ModelConfig, lora_parameters
from common.weights import adapter_state_dict, build_policy_unet


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"b.lora_A": torch.randn(4, 8, generator=gen), "a.lora_B": torch.randn(8, 4, 1, 1, generator=gen)}


def test_digest_is_order_free_and_content_sensitive():
    state = _state()
    assert digest(state) == digest(dict(reversed(list(state.items()))))
    changed = {**state, "a.lora_B": state["a.lora_B"].clone()}
    changed["a.lora_B"][0, 0] += 1e-6
    assert digest(changed) != digest(state)
    renamed = {"c.lora_A" if k == "b.lora_A" else k: v for k, v in state.items()}
    assert digest(renamed) != digest(state)
    # Same bytes, other shape or dtype: a different adapter.
    assert digest({**state, "b.lora_A": state["b.lora_A"].reshape(8, 4)}) != digest(state)
    assert digest({**state, "b.lora_A": state["b.lora_A"].view(torch.int32)}) != digest(state)
    assert digest({"x": torch.ones(2, dtype=torch.bfloat16)}) != digest({"x": torch.ones(2)})


def test_pack_counts_bytes_and_versions():
    weights = pack(3, _state())
    assert isinstance(weights, AdapterWeights) and weights.version == 3
    assert weights.nbytes == (4 * 8 + 8 * 4) * 4
    assert weights.digest == digest(_state())
    verify(weights)
    with pytest.raises(ValueError, match="version"):
        pack(-1, _state())


def test_apply_to_copies_in_place_after_verifying():
    torch.manual_seed(0)
    learner_unet, _ = build_policy_unet(ModelConfig())
    with torch.no_grad():
        for param in lora_parameters(learner_unet).values():
            param.add_(0.01)
    weights = pack(1, adapter_state_dict(learner_unet))

    rollout_unet, _ = build_policy_unet(ModelConfig(tiny_seed=0))
    params_before = {n: p.data_ptr() for n, p in lora_parameters(rollout_unet).items()}
    tampered = dataclasses.replace(weights, tensors={k: v.clone() for k, v in weights.tensors.items()})
    next(iter(tampered.tensors.values())).add_(1.0)
    with pytest.raises(ValueError, match="digest mismatch"):
        apply_to(rollout_unet, tampered)
    assert digest(adapter_state_dict(rollout_unet)) != weights.digest  # untouched by the refused one

    apply_to(rollout_unet, weights)
    assert digest(adapter_state_dict(rollout_unet)) == weights.digest
    assert {n: p.data_ptr() for n, p in lora_parameters(rollout_unet).items()} == params_before  # no rebuild


def test_pickling_round_trips_through_one_flat_buffer():
    state = {
        "a": torch.randn(3, 5),
        "b": torch.randn(2, 1, 1, 3).to(torch.bfloat16),  # no numpy dtype: travels as bytes
        "c": torch.zeros(0),
        "d": torch.arange(7, dtype=torch.int64),
    }
    weights = pack(2, state)
    back = pickle.loads(pickle.dumps(weights, protocol=5))
    assert (back.version, back.digest, back.nbytes) == (2, weights.digest, weights.nbytes)
    verify(back)
    for name, tensor in state.items():
        assert back.tensors[name].dtype == tensor.dtype and torch.equal(back.tensors[name], tensor)
    back.tensors["a"].add_(1.0)  # writable, private memory (not the sender's, not the object store's)
    assert torch.equal(weights.tensors["a"], state["a"])

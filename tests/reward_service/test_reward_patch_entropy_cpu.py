"""The fused CPU kernel: its operands, its bounds, its dispatch, its np.histogram binning.

Its numbers against the naive per-patch loop are pinned in test_reward_proportions.py (every test
there runs on both backends).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_service import patch_entropy_cpu, proportions
from reward_service.config import RewardConfig
from reward_service.proportions import patch_complexity
from tests.reward_service.conftest import naive_complexity


def photo(h: int = 120, w: int = 90) -> torch.Tensor:
    from skimage import data

    rgb = np.ascontiguousarray(data.coffee()[100 : 100 + h, 150 : 150 + w])
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize(("size", "resize"), [(10, 64), (3, 64), (1, 64), (7, 16)])
def test_row_taps_rebuild_the_operator(size: int, resize: int) -> None:
    a = proportions._operators(size, size, resize, dtype=torch.float64, device="cpu", exact=False)[0].numpy()
    taps = patch_entropy_cpu.row_taps(a)
    assert taps is not None
    start, weights = taps
    rebuilt = np.zeros((a.shape[0], a.shape[1] + patch_entropy_cpu.TAPS - 1))
    for i in range(a.shape[0]):
        rebuilt[i, start[i] : start[i] + patch_entropy_cpu.TAPS] = weights[i]
    np.testing.assert_array_equal(rebuilt[:, : a.shape[1]], a)
    assert not rebuilt[:, a.shape[1] :].any()


def test_downsampling_is_not_fused() -> None:
    """A patch larger than twice the resize spans more than three source rows per output row."""
    a = proportions._operators(10, 10, 4, dtype=torch.float64, device="cpu", exact=False)[0].numpy()
    assert patch_entropy_cpu.row_taps(a) is None
    assert proportions._fused_operators(10, 10, 4, torch.float32, exact=False) is None


@pytest.mark.parametrize("size", [10, 4, 2])
def test_bin_bound_holds_on_worst_case_patches(size: int) -> None:
    """Hard 0/1 patterns (checkerboards, stripes, random) never reach the clamp slot."""
    ops = proportions._operators(size, size, 64, dtype=torch.float64, device="cpu", exact=False)
    n_bins = patch_entropy_cpu.bins_needed(*(t.numpy() for t in ops))
    yy, xx = np.mgrid[:size, :size]
    patterns = [(yy + xx) % 2, yy % 2, xx % 2, xx >= size // 2, (yy >= size // 2) ^ (xx >= size // 2)]
    patterns += list(np.random.default_rng(0).integers(0, 2, (200, size, size)))
    patches = torch.from_numpy(np.stack(patterns).astype(np.float64))
    patches = torch.cat([patches, 1 - patches])
    gx, gy = proportions._gradients(patches, ops, 64)
    top = int(torch.sqrt(gx**2 + gy**2).max())
    assert top <= n_bins - 2  # the last slot only guards against float rounding
    assert top >= (n_bins - 2) // 2  # and the bound is not vacuous


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the patch batches that reach the fused kernel."""
    calls: list[tuple[int, ...]] = []
    real = patch_entropy_cpu.class_complexity

    def counting(patches: torch.Tensor, ops: patch_entropy_cpu.FusedOperators) -> torch.Tensor:
        calls.append(tuple(patches.shape))
        return real(patches, ops)

    monkeypatch.setattr(patch_entropy_cpu, "class_complexity", counting)
    return calls


def test_fused_is_the_cpu_default_and_torch_is_not_fused(kernel_calls: list[tuple[int, ...]]) -> None:
    images = photo(125, 93)  # 12 x 9 full patches, a 3-pixel right and a 5-pixel bottom remainder
    auto = patch_complexity(images)
    assert {shape[1:] for shape in kernel_calls} == {(10, 10), (10, 3), (5, 10), (5, 3)}
    assert kernel_calls[0] == (108, 10, 10)
    kernel_calls.clear()
    torch_only = patch_complexity(images, backend="torch")
    assert kernel_calls == []
    np.testing.assert_array_equal(auto.numpy() > 50, torch_only.numpy() > 50)


@pytest.mark.parametrize(("patch_size", "resize"), [(10, 33), (5, 21), (3, 7), (31, 64)])
def test_other_sizes_match_naive(kernel_calls: list[tuple[int, ...]], patch_size: int, resize: int) -> None:
    """Resizes that are not a multiple of the 8 sub-histograms, and a patch needing all 256 bins."""
    rgb = np.ascontiguousarray(photo(67, 71)[0].permute(1, 2, 0).numpy())
    ref = naive_complexity(rgb, ps=patch_size, r=resize)
    got = patch_complexity(photo(67, 71), patch_size=patch_size, resize=resize, backend="fused")[0].numpy()
    assert kernel_calls, "the fused kernel was not used"
    assert np.abs(got - ref).max() < 0.1
    np.testing.assert_array_equal(got > 50, ref > 50)


def test_exact_bin_rule_is_np_histogram() -> None:
    """On the edges themselves, one ulp either side, and in between: np.histogram's bin, exactly."""
    edges = np.linspace(-5.5, 5.5, 513)
    upper = edges[256:]  # magnitudes are >= 0: the middle edge is 0.0 exactly
    values = np.concatenate([upper, np.nextafter(upper, -np.inf)[1:], np.nextafter(upper, np.inf)[:-1]])
    values = np.concatenate([values, (upper[:-1] + upper[1:]) / 2, [0.0, 5.5]])
    expected = np.array([np.histogram([v], bins=512, range=(-5.5, 5.5))[0].argmax() - 256 for v in values])
    norm = 512 / (edges[-1] - edges[0])  # as np.histogram computes it
    got = np.array([patch_entropy_cpu._histogram_bin(v, edges, norm, 255) for v in values])
    np.testing.assert_array_equal(got, expected)


def test_exact_mode_matches_the_torch_exact_path() -> None:
    """The float64 re-check in the kernel against the torch np.histogram-rules path, 2601 patches.

    Both compute float64 magnitudes in their own operation order, so a magnitude that lies on a bin
    edge in exact arithmetic can round to either side (one value of this photo does): equal up to
    such values, and identical decisions.
    """
    from skimage import data

    rgb = np.ascontiguousarray(data.astronaut()[:510, :510])
    g8 = proportions.to_gray8(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    patches8 = next(iter(proportions._size_classes(g8, 10)))[2]
    fused = proportions._class_complexity(patches8, 64, 64, torch.float64, exact=True, fused=True)
    reference = proportions._class_complexity(patches8, 64, 64, torch.float64, exact=True, fused=False)
    diff = (fused - reference).abs()
    assert float(diff.max()) < 0.05 and float(diff.median()) < 1e-12
    assert int((diff > 1e-9).sum()) <= 2
    torch.testing.assert_close(fused > 50, reference > 50)


def test_torch_thread_count_is_left_alone() -> None:
    """A numba thread pool (OpenMP layer) would reset torch's thread count to the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        patch_complexity(photo(), backend="fused")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_backend_errors() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        patch_complexity(photo(), backend="numba")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CPU kernel"):
        patch_complexity(torch.zeros(1, 3, 8, 8, device="meta"), backend="fused")
    with pytest.raises(ValueError, match="dtype must be"):
        patch_complexity(photo(), dtype=torch.float16)
    with pytest.raises(ValueError, match="CPU kernel"):
        RewardConfig(proportions_backend="fused", device="cuda")

"""The learning benchmark's control rewards rank samples the way the README's control table says they do.

The README reports that GDPO learns ``--control brighter`` backwards; that claim needs the control's
advantages to favour the brighter sample in the first place (and ``darker`` the darker one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.bench_learning import control_worker


def _advantages(name: str, images: torch.Tensor) -> np.ndarray:
    """Eq. 8 advantages of one group ``[G, 3, H, W]`` under the control ``name``."""
    worker = control_worker(name)
    result = worker.score_images(images.unsqueeze(0), torch.zeros(1, 3, *images.shape[-2:], dtype=torch.uint8))
    return result.advantage[0]


@pytest.fixture
def group() -> torch.Tensor:
    """Three samples of one smooth image: plain, brighter by 0.1, and with sharp stripes of zero mean added."""
    base = torch.linspace(0.2, 0.7, 16).expand(1, 3, 16, 16).clone()
    stripes = ((torch.arange(16) // 2) % 2).float().mul(0.1).sub(0.05).expand_as(base)  # period 4: Sobel sees it
    return torch.cat([base, base + 0.1, base + stripes])


def test_brighter_and_darker_prefer_opposite_samples(group: torch.Tensor) -> None:
    brighter, darker = _advantages("brighter", group), _advantages("darker", group)
    assert brighter.argmax() == 1 and darker.argmin() == 1
    np.testing.assert_allclose(brighter, -darker, atol=1e-6)


def test_sharper_prefers_more_gradient(group: torch.Tensor) -> None:
    assert _advantages("sharper", group).argmax() == 2


def test_random_prefers_among_identical_samples(group: torch.Tensor) -> None:
    """The coin scores samples, not images: three copies of one image still get a spread of advantages."""
    same = group[:1].expand(3, -1, -1, -1)
    assert _advantages("brighter", same).tolist() == [0.0, 0.0, 0.0]
    assert np.ptp(_advantages("random", same)) > 0.5

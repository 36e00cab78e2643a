"""Learner memory: reference by adapter-disable versus a second frozen UNet copy (issue 2).

Each variant runs in a fresh process on an SD 2.1-sized UNet (random weights,
CPU, float32): build the policy (UNet + rank-4 ``gdpo`` LoRA) and the
reference, then one GDPO loss forward/backward on one image with G=2 at
``--latent`` x ``--latent`` latents.  Peak RSS comes from ``getrusage``.
Target: adapter-disable / copy <= 0.6.

    python benchmarks/bench_reference_memory.py [--latent 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_variant(variant: str, latent: int) -> dict:
    import torch

    from benchmarks.sd21_unet import SD21_TEXT_DIM, sd21_unet
    from common.naosd import UNET_LORA_PATTERNS, adapter_disabled, add_gdpo_adapter
    from common.tiny import sd21_scheduler

    torch.set_grad_enabled(True)
    start = time.perf_counter()
    unet = sd21_unet()
    params = sum(p.numel() for p in unet.parameters())
    frozen_copy = copy.deepcopy(unet).requires_grad_(False) if variant == "copy" else None
    add_gdpo_adapter(unet, rank=4, alpha=8, patterns=UNET_LORA_PATTERNS)
    abar = sd21_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, latent, latent, generator=g)
    eps = torch.randn(2, 4, latent, latent, generator=g)
    emb = torch.randn(2, 77, SD21_TEXT_DIM, generator=g)
    x = abar[250].sqrt() * z0 + (1 - abar[250]).sqrt() * eps
    l_pol = (unet(x, 100, encoder_hidden_states=emb).sample - eps).pow(2).mean(dim=(1, 2, 3))
    with torch.no_grad():
        if frozen_copy is None:
            with adapter_disabled(unet):
                l_ref = (unet(x, 100, encoder_hidden_states=emb).sample - eps).pow(2).mean(dim=(1, 2, 3))
        else:
            l_ref = (frozen_copy(x, 100, encoder_hidden_states=emb).sample - eps).pow(2).mean(dim=(1, 2, 3))
    adv = torch.tensor([1.0, -1.0])
    loss = -torch.nn.functional.logsigmoid(-0.5 * 5000 * (adv * (l_pol - l_ref)).sum())
    loss.backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "params": params,
        "peak_rss_gib": peak_kib / 2**20,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=16, help="latent side (image side / 8)")
    parser.add_argument("--variant", choices=["adapter", "copy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.latent)))
        return
    results = {}
    for variant in ("adapter", "copy"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--latent", str(args.latent)],
            check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} params={results[variant]['params'] / 1e6:.1f}M "
              f"peak RSS={results[variant]['peak_rss_gib']:.2f} GiB ({results[variant]['seconds']:.0f} s)")  # fmt: skip
    ratio = results["adapter"]["peak_rss_gib"] / results["copy"]["peak_rss_gib"]
    print(f"peak RSS ratio adapter-disable / second copy = {ratio:.3f} (target <= 0.6)")


if __name__ == "__main__":
    main()

"""Train the tiny UNet as a diffusion denoiser (a toy SD prior) on the committed tiny VAE's latents.

An experiment for issue 9, not part of the product.  Eq. 9 lowers the policy's denoising error on the
preferred samples; that moves a *one-step* sampler toward them only where the UNet's noise prediction
rises with the latent, as a denoiser's does (``tests/learner/test_gdpo_sampler_direction.py``).  The
committed tiny NAOSD was trained from scratch as a one-step SR map, not as a denoiser, and along the
directions it reproduces its noise prediction falls with the latent.  SD 2.1-base, which the paper's
NAOSD keeps under a rank-4 LoRA, is a denoiser.  This script makes a tiny one: the committed VAE
(frozen) and a fresh tiny UNet trained with the DDPM epsilon loss at uniform timesteps on random crops
of the embedded *training* photos (the held-out ones are never read), empty prompt.  It writes a folder
of the tiny architecture that ``bench_learning.py --naosd-path`` and ``bench_gdpo_gradient.py
--naosd-path`` load; sample it with equal timesteps (``--t-add 250 --t-diff 250``), where its one step is
the denoiser's own estimate of the clean latent.  The folder is also a complete SD-layout folder (the
default model's seeded tiny text encoder, the CLIP tokenizer, SD 2.1's scheduler), so it can stand in for
SD 2.1-base as a toy prior: ``python -m learner.pretrain ... model.source=pretrained
model.sd_path=runs/tiny-denoiser`` pre-trains a LoRA NAOSD on it the way SPEC section 9 does on SD.

    python benchmarks/train_tiny_denoiser.py --out runs/tiny-denoiser
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common.naosd import ModelConfig, q_sample
from common.tiny import tiny_unet
from common.weights import build_naosd, export_merged
from sr_data.embedded_images import EMBEDDED_IMAGES, load_embedded


def training_crops(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random ``size``-pixel crops of the embedded training photos, flipped at random, in [-1, 1].

    Whole crops, drawn once: ``sr_data.source.PairSource`` draws the same kind of crop but also degrades each
    to its LR, which this prior never reads.  (The README's denoiser numbers were measured on these crops.)"""
    rng = np.random.default_rng(seed)
    photos = [load_embedded(name) for name in EMBEDDED_IMAGES]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crop = photo[y : y + size, x : x + size]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (an SD layout of the tiny architecture)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--crops", type=int, default=4096, help="crops drawn once; each step samples a batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    model = build_naosd(ModelConfig())  # the committed VAE and the empty prompt's embedding
    model.vae.requires_grad_(False).eval()
    with torch.no_grad():
        text_emb = model.encode_prompts([""])
    unet = tiny_unet(args.seed).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    crops = training_crops(args.crops, args.crop, args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = crops[torch.randint(len(crops), (args.batch,))]
        with torch.no_grad():
            z0 = model.encode(batch)
        t = torch.randint(0, 1000, (args.batch,))
        eps = torch.randn_like(z0)
        x = q_sample(z0, eps, model.alphas_cumprod[t].view(-1, 1, 1, 1))
        pred = unet(x, t, encoder_hidden_states=text_emb.expand(args.batch, -1, -1)).sample
        loss = F.mse_loss(pred, eps)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(args.steps // 20, 1) == 0:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)  # fmt: skip
    # The default model with this UNet: the committed VAE and source=tiny's text encoder, tokenizer and scheduler.
    model.unet = unet.eval()
    out = export_merged(model, args.out)
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

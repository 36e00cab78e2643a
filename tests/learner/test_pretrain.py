"""NAOSD pre-training (SPEC section 9): what trains, VSD on the tiny model, export, exact resume, the Ray job."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from common.clip_vocab import clip_tokenizer
from common.naosd import ModelConfig
from common.tiny import sd21_scheduler, tiny_text_encoder, tiny_unet, tiny_vae
from common.weights import build_naosd
from learner.pretrain_loss import PretrainLossConfig, vsd_loss
from learner.pretrain_model import FAKE_ADAPTER, NAOSD_ADAPTER, PretrainModelConfig, PretrainNAOSD
from learner.pretrain_rank import PretrainConfig, PretrainRank, lpips_loss
from sr_data.source import DataConfig

NO_LPIPS = PretrainLossConfig(lambda_lpips=0.0)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for SD 2.1-base: the tiny architecture (random weights) in diffusers' layout."""
    root = tmp_path_factory.mktemp("sd")
    tiny_unet(0).save_pretrained(root / "unet")
    tiny_vae(0).save_pretrained(root / "vae")
    tiny_text_encoder(0).save_pretrained(root / "text_encoder")
    clip_tokenizer().save_pretrained(root / "tokenizer")
    sd21_scheduler().save_pretrained(root / "scheduler")
    return root


def _lora_model(sd_folder: Path, loss: PretrainLossConfig = NO_LPIPS) -> PretrainNAOSD:
    torch.manual_seed(0)
    return PretrainNAOSD(ModelConfig(source="pretrained", sd_path=str(sd_folder)), PretrainModelConfig(), loss)


def _randomise(params, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _images(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hr = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    lr = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(hr, 4), scale_factor=4, mode="bicubic")
    return lr.clamp(-1, 1), hr, torch.randn(2, 77, 32, generator=gen)


def test_lora_mode_trains_the_naosd_adapters_and_the_fake_score_only(sd_folder):
    model = _lora_model(sd_folder)
    groups = model.trainable_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    generator = [names[id(p)] for p in groups["generator"]]
    fake = [names[id(p)] for p in groups["fake"]]
    assert generator and all(f".{NAOSD_ADAPTER}." in n for n in generator)
    assert any(n.startswith("naosd.unet.") for n in generator) and any(".vae.encoder." in n for n in generator)
    assert not any(".vae.decoder." in n for n in generator), "the VAE decoder stays frozen"
    assert fake and all(f".{FAKE_ADAPTER}." in n and n.startswith("naosd.unet.") for n in fake)
    lr, hr, text = _images()
    model(lr, hr, text, text * 0, generator=torch.Generator().manual_seed(0), lpips=None)
    # peft's adapter switches flip requires_grad; after a step exactly the two groups train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(generator) | set(fake)
    assert not any(p.requires_grad for p in model.naosd.text_encoder.parameters())


def test_from_scratch_trains_every_unet_and_vae_weight_and_refuses_vsd():
    scratch = PretrainNAOSD(ModelConfig(source="tiny_random"), PretrainModelConfig(train_base=True),
                            PretrainLossConfig(lambda_lpips=0, lambda_vsd=0))  # fmt: skip
    count = sum(p.numel() for p in scratch.trainable_groups()["generator"])
    assert count == sum(p.numel() for p in [*scratch.naosd.unet.parameters(), *scratch.naosd.vae.parameters()])
    with pytest.raises(ValueError, match="real score"):
        PretrainNAOSD(ModelConfig(source="tiny_random"), PretrainModelConfig(train_base=True), NO_LPIPS)
    with pytest.raises(ValueError, match="source=pretrained"):
        PretrainNAOSD(ModelConfig(source="tiny_random"), PretrainModelConfig(), NO_LPIPS)


def test_vsd_on_the_tiny_model_uses_the_bare_base_as_real_and_the_fake_adapter_alone_as_fake(sd_folder):
    """VSD of the model equals VSD with score networks built independently: a fresh base UNet, and the fake LoRA."""
    model = _lora_model(sd_folder)
    _randomise(model.trainable_groups()["generator"], seed=1)  # the NAOSD LoRA must not leak into either score
    _randomise(model.trainable_groups()["fake"], seed=2)
    unet = model.naosd.unet
    base = tiny_unet(0)  # the same weights as sd_folder/unet, no adapter: the real score
    z_sr = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    noise, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4)), torch.tensor([20, 600])
    text, negative = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    abar = model.naosd.alphas_cumprod
    common = dict(noise=noise, timesteps=t, text_emb=text, negative_emb=negative, alphas_cumprod=abar, cfg_scale=7.5)
    ours = vsd_loss(z_sr, real=model._eps(None), fake=model._eps(FAKE_ADAPTER), **common)

    def fake_alone(z, tt, emb):
        unet.set_adapter(FAKE_ADAPTER)
        try:
            return unet(z, tt, encoder_hidden_states=emb).sample
        finally:
            unet.set_adapter(NAOSD_ADAPTER)

    real = lambda z, tt, emb: base(z, tt, encoder_hidden_states=emb).sample  # noqa: E731
    independent = vsd_loss(z_sr, real=real, fake=fake_alone, **common)
    torch.testing.assert_close(ours, independent, rtol=1e-4, atol=1e-6)
    assert float(ours) > 0
    # With a fake LoRA of B = 0 the fake score is the base, and only CFG separates it from the real one.
    _randomise([p for n, p in unet.named_parameters() if f".{FAKE_ADAPTER}." in n and "lora_B" in n], seed=0, std=0)
    same = vsd_loss(z_sr, real=real, fake=model._eps(FAKE_ADAPTER), **{**common, "cfg_scale": 1.0})
    assert float(same) < 1e-10


def test_export_is_what_gdpo_loads_and_gives_the_same_images(sd_folder, tmp_path):
    model = _lora_model(sd_folder)
    _randomise(model.trainable_groups()["generator"], seed=1, std=0.02)
    out = model.export(tmp_path / "naosd")
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["unet", "vae_encoder"]  # peft adapter folders
    loaded = build_naosd(ModelConfig(source="pretrained", sd_path=str(sd_folder), naosd_path=str(out)))
    lr, _, _ = _images()
    with torch.no_grad():
        emb = model.naosd.encode_prompts([""]).expand(2, -1, -1)
        model.naosd.unet.set_adapter(NAOSD_ADAPTER)
        want = model.naosd.one_step(lr, emb, torch.Generator().manual_seed(5)).sr
        got = loaded.one_step(lr, emb, torch.Generator().manual_seed(5)).sr
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # merged vs LoRA: different kernels


def test_lpips_term_reads_local_weights_and_refuses_to_run_without_them(tmp_path):
    from pyiqa.archs import lpips_arch

    with pytest.raises(ValueError, match="lambda_lpips"):
        lpips_loss(str(tmp_path / "none"), "cpu")
    # The squeeze variant has small weights a test can write; VGG's are the same code path.
    torch.save(torchvision.models.squeezenet1_1().state_dict(), tmp_path / "squeezenet1_1-b8a52dc0.pth")
    torch.manual_seed(0)
    net = lpips_arch.LPIPS(pretrained=False, net="squeeze", pnet_rand=True)
    # LPIPS's trained linear heads are non-negative (the paper clamps them), so the distance is >= 0.
    torch.save({k: v.abs() for k, v in net.state_dict().items() if k.startswith("lin")},
               tmp_path / Path(lpips_arch.default_model_urls["0.1_squeeze"]).name)  # fmt: skip
    loss = lpips_loss(str(tmp_path), "cpu", name="lpips", net="squeeze")
    _, hr, _ = _images(size=32)
    sr = (hr + 0.2 * torch.randn_like(hr)).clamp(-1, 1).requires_grad_(True)
    value = loss(sr, hr)
    assert float(loss(hr, hr).max()) == 0.0 and float(value.mean()) > 0
    assert torch.autograd.grad(value.mean(), sr)[0].abs().sum() > 0  # a loss: gradients reach the image


def _tiny_pretrain(**pretrain: object) -> tuple[ModelConfig, PretrainConfig, DataConfig]:
    config = PretrainConfig(batch_size=2, lr=1e-3, device="cpu", model=PretrainModelConfig(train_base=True),
                            loss=PretrainLossConfig(lambda_lpips=0, lambda_vsd=0, lambda_recon=1.0, lambda_kl=1e-4),
                            **pretrain)  # fmt: skip
    return ModelConfig(source="tiny_random"), config, DataConfig(crop_size=16, degradation="bicubic")


@pytest.mark.slow
def test_rank_resumes_exactly(tmp_path, free_port):
    """2 steps, checkpoint, 2 more == 4 steps straight: same adapter-free weights, bit for bit (same code path)."""
    model, config, data = _tiny_pretrain(lr_decay_steps=4)
    straight = PretrainRank(model, config, data, 0, 1, "127.0.0.1", free_port)
    stats = [straight.train_step() for _ in range(4)]
    assert [s["step"] for s in stats] == [1, 2, 3, 4] and all(math.isfinite(s["loss_total"]) for s in stats)
    first = PretrainRank(model, config, data, 0, 1, "127.0.0.1", free_port)
    first.train_step(), first.train_step()
    checkpoint = first.save_checkpoint(tmp_path)
    assert checkpoint == str(tmp_path / "checkpoint-2")
    resumed = PretrainRank(model, config, data, 0, 1, "127.0.0.1", free_port)
    assert resumed.load_checkpoint(checkpoint) == 2
    assert resumed.indices(2) == [4, 5]  # the data position is the step
    resumed.train_step(), resumed.train_step()
    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(want[k], first.model.state_dict()[k]) for k in want)


@pytest.mark.slow
def test_pretrain_job_through_ray_resumes_and_gdpo_loads_its_output(ray_session, tmp_path, capsys):
    from learner.pretrain import load_pretrain_job, pretrain

    overrides = [f"run.output_dir={tmp_path}", "run.steps=2", "run.log_every=1", "run.checkpoint_every=1",
                 "data.crop_size=16", "pretrain.batch_size=4", "metrics.enabled=false", "run.export_dtype=float16"]
    stats = pretrain(load_pretrain_job("tiny_pretrain", overrides))
    assert stats["step"] == 2 and math.isfinite(stats["loss_total"])
    stats = pretrain(load_pretrain_job("tiny_pretrain", [*overrides, "run.steps=3"]))
    printed = capsys.readouterr().out
    assert "resumed from checkpoint-2 at step 2" in printed and "pretrain step 3/3" in printed and stats["step"] == 3
    model = build_naosd(ModelConfig(source="tiny", naosd_path=str(tmp_path / "naosd")))
    weights = safetensors.torch.load_file(tmp_path / "naosd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}  # run.export_dtype=float16
    assert model.unet.conv_in.weight.dtype == torch.float32  # the loader upcasts
    torch.testing.assert_close(model.unet.conv_in.weight, weights["conv_in.weight"].float(), rtol=0, atol=0)
    assert not torch.equal(model.unet.conv_in.weight, tiny_unet(0).conv_in.weight)



def test_pretrain_job_keeps_checkpoints_and_model_in_run_storage(ray_session, tmp_path, capsys):
    """run.storage as a URI: a second run in another output_dir resumes from it, and the model lands there."""
    from learner.pretrain import load_pretrain_job, pretrain

    store = tmp_path / "store"
    overrides = [f"run.storage=file://{store}", "run.log_every=1", "run.checkpoint_every=1", "data.crop_size=16",
                 "pretrain.batch_size=4", "metrics.enabled=false"]  # fmt: skip
    pretrain(load_pretrain_job("tiny_pretrain", [*overrides, f"run.output_dir={tmp_path / 'a'}", "run.steps=2"]))
    assert not (tmp_path / "a" / "checkpoints").exists() and (store / "checkpoints" / "checkpoint-2").is_dir()
    pretrain(load_pretrain_job("tiny_pretrain", [*overrides, f"run.output_dir={tmp_path / 'b'}", "run.steps=3"]))
    assert "resumed from checkpoint-2 at step 2" in capsys.readouterr().out
    assert (store / "config.yaml").is_file() and (tmp_path / "b" / "config.yaml").is_file()
    model = build_naosd(ModelConfig(source="tiny", naosd_path=str(store / "naosd")))  # uploaded by rank 0
    assert not torch.equal(model.unet.conv_in.weight, tiny_unet(0).conv_in.weight)

def test_from_scratch_reconstruction_and_kl_terms_match_a_hand_computation():
    loss = PretrainLossConfig(lambda_lpips=0, lambda_vsd=0, lambda_recon=1.0, lambda_kl=1.0)
    model = PretrainNAOSD(ModelConfig(source="tiny_random"), PretrainModelConfig(train_base=True), loss)
    lr, hr, text = _images()
    out = model(lr, hr, text, text, generator=torch.Generator().manual_seed(7), lpips=None)
    naosd, gen = model.naosd, torch.Generator().manual_seed(7)  # replay the same draws in the same order
    with torch.no_grad():
        step = naosd.one_step(lr, text, gen)
        z_hr = naosd.encode(hr, gen) / naosd.scaling_factor
        recon = ((naosd.vae.decode(z_hr).sample - hr) ** 2).mean()
        post = step.posterior
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar)  # KL(N(mu, var) || N(0, 1)) per latent element
    terms = out.generator.terms
    assert terms["pixel"] == pytest.approx(float(((step.sr - hr) ** 2).mean()), rel=1e-5)
    assert terms["recon"] == pytest.approx(float(recon), rel=1e-5)
    assert terms["kl"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert float(out.generator.total) == pytest.approx(terms["pixel"] + terms["recon"] + terms["kl"], rel=1e-6)


def test_the_pretraining_driver_never_imports_deepspeed():
    """DeepSpeed lives in learner.engine and is imported by the rank actors only."""
    import subprocess
    import sys

    code = "import sys, learner.pretrain; sys.exit('deepspeed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_shipped_pretraining_configs_hold_the_reference_values():
    from learner.pretrain import load_pretrain_job

    paper = load_pretrain_job("paper_pretrain")
    p = paper.pretrain
    assert (p.batch_size, p.lr, p.fake_lr, p.grad_clip, p.lr_decay_steps, paper.run.steps) == (16, 5e-5, 5e-5, 1.0, 0,
                                                                                               35_000)  # fmt: skip
    ranks = (p.model.unet_lora_rank, p.model.vae_lora_rank, p.model.fake_lora_rank)
    assert not p.model.train_base and ranks == (4, 4, 8)
    assert (p.loss.lambda_l2, p.loss.lambda_lpips, p.loss.lambda_vsd, p.loss.cfg_scale) == (1.0, 2.0, 1.0, 7.5)
    assert paper.data.degradation == "realesrgan" and paper.data.crop_size == 512
    tiny = load_pretrain_job("tiny_pretrain")
    assert tiny.model.source == "tiny_random" and tiny.pretrain.model.train_base and tiny.pretrain.loss.lambda_vsd == 0
    assert tiny.data.hr_dir == ""  # the embedded training photos: the held-out ones are never read
    assert (tiny.run.export_dtype, paper.run.export_dtype) == ("float32", "float32")  # the committed tiny model
    with pytest.raises(ValueError, match="lpips_weights_dir"):
        load_pretrain_job("paper_pretrain", ['pretrain.lpips_weights_dir=""'])


def test_step_stats_become_prometheus_series():
    from prometheus_client import generate_latest

    from common.telemetry import PretrainTelemetry
    from learner.pretrain import _record

    telemetry = PretrainTelemetry()
    stats = {"step": 3.0, "loss_pixel": 0.25, "loss_vsd": 0.5, "loss_total": 0.75, "grad_norm_generator": 1.5}
    _record(telemetry, stats, seconds=0.2, batch_size=16)
    text = generate_latest(telemetry.registry).decode()
    for line in ('naosd_pretrain_step 3.0', 'naosd_pretrain_loss{term="pixel"} 0.25',
                 'naosd_pretrain_loss{term="vsd"} 0.5', 'naosd_pretrain_grad_norm{group="generator"} 1.5',
                 "naosd_pretrain_samples_total 16.0", "naosd_pretrain_step_seconds_count 1.0"):  # fmt: skip
        assert line in text, line

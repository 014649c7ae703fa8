"""Build tests/fixtures/wan_pipeline_tiny/: a tiny random Wan 2.1 text-to-video pipeline in
diffusers format plus end-to-end reference outputs from diffusers' WanPipeline.

Run from the repository root with the PyTorch reference environment (not the project's .venv):

    /path/to/torch-env/bin/python scripts/make_pipeline_fixtures.py [--out tests/fixtures/wan_pipeline_tiny]

(here: /work/torchvenv/bin/python). It needs tests/fixtures/umt5_tiny/ (scripts/make_text_fixtures.py):
the tiny UMT5 encoder weights and the tokenizer are taken from there. No network access is used.

Writes, into the output folder (WanPipeline.save_pretrained layout, safetensors weights):
  model_index.json
  tokenizer/       tokenizer.json + tokenizer_config.json (+ spiece.model), copied from umt5_tiny
  text_encoder/    UMT5EncoderModel (d_model 32), umt5_tiny's weights
  transformer/     WanTransformer3DModel (in/out 4, text_dim 32, 2 heads x 12, 2 layers, ffn 32,
                   freq_dim 16, patch (1,2,2)), every parameter re-randomised
  vae/             AutoencoderKLWan (base_dim 8, z_dim 4), random latents_mean / latents_std,
                   norm gammas and biases re-randomised
  scheduler/       FlowMatchEulerDiscreteScheduler(shift=3.0)
  io.npz           noise       (B, C, F, H, W) = (2, 4, 3, 4, 6) float32, seeded torch.Generator;
                                passed as `latents=` to every run below
                   latents_cfg  final denoised latents, guidance 4.0, output_type="latent"
                                (normalised latent space: BEFORE the VAE's latents_mean/std
                                de-normalisation and decoding)
                   latents_nocfg same, guidance 1.0 (no classifier-free guidance)
                   frames_cfg   output_type="np" of the guidance-4.0 run, (B, 9, 32, 48, 3) in [0, 1]
                   timesteps, sigmas   the scheduler's values for 4 steps (sigmas has 5 entries)
                   prompt_embeds, negative_prompt_embeds, ids, mask   the text path (debug aids)
                   scalars: steps=4, guidance=4.0, shift=3.0, frames=9, height=32, width=48,
                            max_sequence_length=16
  io.json          {"prompts": [...], "negative_prompt": ""}

Deterministic: every random draw is seeded, so running it twice writes the same numbers.
"""
import argparse
import json
import math
import pathlib
import shutil

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
UMT5 = ROOT / "tests/fixtures/umt5_tiny"

PROMPTS = ["a red circle moves right", "a blue square moves up"]
NEGATIVE = ""
STEPS, GUIDANCE, SHIFT = 4, 4.0, 3.0
FRAMES, HEIGHT, WIDTH, MAX_LEN = 9, 32, 48, 16

VAE_CFG = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
DIT_CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
               out_channels=4, text_dim=None, freq_dim=16, ffn_dim=32, num_layers=2,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


@torch.no_grad()
def rerandomise_dit(model, gen):
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name):
            base = 1.0 if name.endswith("weight") else 0.0  # norm affines near identity
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.ndim >= 2 and "scale_shift_table" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
        else:  # biases and modulation tables (zeros / tiny by default)
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def rerandomise_vae(model, gen):
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        # conv weights keep their (seeded, random) default init


def build_pipeline():
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import AutoTokenizer, UMT5EncoderModel

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)

    tokenizer = AutoTokenizer.from_pretrained(str(UMT5 / "tokenizer"))
    text_encoder = UMT5EncoderModel.from_pretrained(str(UMT5 / "text_encoder")).eval()

    mean = (0.5 * torch.randn(VAE_CFG["z_dim"], generator=gen)).tolist()
    std = (0.5 + 1.5 * torch.rand(VAE_CFG["z_dim"], generator=gen)).tolist()
    vae = AutoencoderKLWan(**VAE_CFG, latents_mean=mean, latents_std=std).eval()
    rerandomise_vae(vae, gen)

    transformer = WanTransformer3DModel(**dict(DIT_CFG, text_dim=text_encoder.config.d_model)).eval()
    rerandomise_dit(transformer, gen)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                       vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, gen


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/wan_pipeline_tiny"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)

    from diffusers.utils import is_ftfy_available
    if is_ftfy_available():  # WanPipeline's prompt_clean runs ftfy.fix_text when importable
        import ftfy
        assert all(ftfy.fix_text(p) == p for p in PROMPTS + [NEGATIVE]), "ftfy would change a prompt"
        print("note: ftfy is installed; it leaves these ASCII prompts unchanged")

    pipe, gen = build_pipeline()
    pipe.save_pretrained(str(out), safe_serialization=True)
    if not (out / "tokenizer/spiece.model").exists():  # keep both tokenizer formats, like Wan ckpts
        shutil.copy(UMT5 / "tokenizer/spiece.model", out / "tokenizer/spiece.model")

    B = len(PROMPTS)
    C = pipe.transformer.config.in_channels
    lf = (FRAMES - 1) // pipe.vae_scale_factor_temporal + 1
    lh, lw = HEIGHT // pipe.vae_scale_factor_spatial, WIDTH // pipe.vae_scale_factor_spatial
    noise_gen = torch.Generator().manual_seed(42)
    noise = torch.randn(B, C, lf, lh, lw, generator=noise_gen, dtype=torch.float32)
    assert noise.shape == (2, 4, 3, 4, 6), noise.shape

    common = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, num_frames=FRAMES, height=HEIGHT,
                  width=WIDTH, num_inference_steps=STEPS, max_sequence_length=MAX_LEN)
    with torch.no_grad():
        lat_cfg = pipe(**common, guidance_scale=GUIDANCE, latents=noise.clone(), output_type="latent").frames
        lat_nocfg = pipe(**common, guidance_scale=1.0, latents=noise.clone(), output_type="latent").frames
        frames = pipe(**common, guidance_scale=GUIDANCE, latents=noise.clone(), output_type="np").frames
        # Self-consistency: decode latents_cfg by hand exactly as the pipeline's non-latent branch.
        m = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        s = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = pipe.vae.decode(lat_cfg * s + m, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        manual = ((video / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 4, 1).numpy()
        # Text path (debug aids for the JAX side).
        pe, npe = pipe.encode_prompt(PROMPTS, NEGATIVE, do_classifier_free_guidance=True,
                                     max_sequence_length=MAX_LEN)
        tok = pipe.tokenizer(PROMPTS + [NEGATIVE], padding="max_length", max_length=MAX_LEN,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        pipe.scheduler.set_timesteps(STEPS)
        timesteps, sigmas = pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone()

    assert isinstance(lat_cfg, torch.Tensor) and tuple(lat_cfg.shape) == (2, 4, 3, 4, 6), lat_cfg.shape
    assert tuple(lat_nocfg.shape) == (2, 4, 3, 4, 6)
    assert isinstance(frames, np.ndarray) and frames.shape == (2, FRAMES, HEIGHT, WIDTH, 3), frames.shape
    assert frames.min() >= 0 and frames.max() <= 1
    dec_err = float(np.abs(manual - frames).max())
    assert dec_err < 1e-5, dec_err
    assert float((lat_cfg - lat_nocfg).abs().max()) > 1e-3, "CFG made no difference"

    # The saved folder must reproduce the run: reload it (offline) and sample again.
    from diffusers import WanPipeline
    re_pipe = WanPipeline.from_pretrained(str(out), local_files_only=True)
    re_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        re_lat = re_pipe(**common, guidance_scale=GUIDANCE, latents=noise.clone(), output_type="latent").frames
    reload_err = float((re_lat - lat_cfg).abs().max())
    assert reload_err < 1e-6, reload_err

    np.savez(out / "io.npz", noise=noise.numpy(), latents_cfg=lat_cfg.float().numpy(),
             latents_nocfg=lat_nocfg.float().numpy(), frames_cfg=frames.astype(np.float32),
             timesteps=timesteps.numpy(), sigmas=sigmas.numpy(), prompt_embeds=pe.numpy(),
             negative_prompt_embeds=npe.numpy(), ids=tok.input_ids.numpy().astype(np.int32),
             mask=tok.attention_mask.numpy().astype(np.int32),
             steps=np.int32(STEPS), guidance=np.float32(GUIDANCE), shift=np.float32(SHIFT),
             frames=np.int32(FRAMES), height=np.int32(HEIGHT), width=np.int32(WIDTH),
             max_sequence_length=np.int32(MAX_LEN))
    (out / "io.json").write_text(json.dumps({"prompts": PROMPTS, "negative_prompt": NEGATIVE}, indent=2) + "\n")

    print("timesteps", timesteps.tolist(), "sigmas", sigmas.tolist())
    print("token mask lengths", tok.attention_mask.sum(1).tolist())
    print(f"max|noise| {noise.abs().max():.4f}  max|latents_cfg| {lat_cfg.abs().max():.4f}  "
          f"max|latents_nocfg| {lat_nocfg.abs().max():.4f}  max|cfg-nocfg| {(lat_cfg - lat_nocfg).abs().max():.4f}")
    print(f"frames range [{frames.min():.4f}, {frames.max():.4f}] mean {frames.mean():.4f} "
          f"std {frames.std():.4f}  manual-decode err {dec_err:.2e}  reload err {reload_err:.2e}")
    print("latents_cfg checksum", float(lat_cfg.double().sum()), "frames checksum", float(frames.astype(np.float64).sum()))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}  {f.stat().st_size}")
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    assert total < 3e6


if __name__ == "__main__":
    main()

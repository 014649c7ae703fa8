"""Which caption words a trained DiT uses: its denoising error with the true caption vs with one
attribute word swapped.

    python scripts/text_probe.py --workdir RUN [--clips 48] [--sigmas 0.5,0.8,0.95] [--out P.json]

Takes single-object training clips from the run's latent cache (RUN/latents, normalized as the
DiT sees them), noises their first window at each noise level sigma with one fixed noise draw,
and measures the mean squared error of the DiT's clean-latent estimate x0 = x_sigma - sigma * v
per latent frame under the true caption and under captions with the colour word, the direction
word (left <-> right, up <-> down) or everything removed (""). Two settings: text-to-video (all
frames noised) and image-to-video (latent frame 0 given clean at noise level 0, as the sampler's
i2v mode gives it). A model that uses a word has a clearly larger error when that word is wrong;
a difference near 0 means the DiT ignores it. Run on the world data only (its captions have the
world's grammar). Prints a table; --out writes it as JSON.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E402 (repo root)
from sorajax import cli, conditioning, fileio, flow, inference  # noqa: E402
from sorajax import latents as latent_lib  # noqa: E402
from sorajax.data import world as world_lib  # noqa: E402
from sorajax.errors import UserError  # noqa: E402

_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swap_color(caption: str) -> str:
    """The first object's colour replaced by the colour 3 places on in the world's list."""
    names = list(world_lib.COLORS)
    for i, c in enumerate(names):
        pat = rf"\b{c} (circle|square|triangle)\b"
        if re.search(pat, caption):
            return re.sub(pat, rf"{names[(i + 3) % len(names)]} \1", caption, count=1)
    return caption


def swap_direction(caption: str) -> str:
    """Every motion word reversed: "moves up-left" -> "moves down-right"."""
    return re.sub(r"moves (\S+)", lambda m: "moves " + "-".join(_OPPOSITE.get(p, p) for p in m.group(1).split("-")),
                  caption)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained run with its latent cache (RUN/latents)")
    p.add_argument("--clips", type=int, default=48, help="single-object moving training clips to probe")
    p.add_argument("--sigmas", default="0.5,0.8,0.95", help="comma-separated noise levels in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="clip choice and noise draw")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    return p.parse_args(argv)


def probe(workdir: str, clips: int = 48, sigmas=(0.5, 0.8, 0.95), seed: int = 0) -> dict:
    cache_dir = os.path.join(workdir, "latents")
    if not os.path.exists(os.path.join(cache_dir, "cache.json")):
        raise UserError(f"--workdir {workdir}: no latent cache at {cache_dir} (a DiT run of the world data has one)")
    if not all(0.0 < s <= 1.0 for s in sigmas):
        raise UserError(f"--sigmas {','.join(map(str, sigmas))}: each must be in (0, 1]")
    pipe = inference.load_pipeline(workdir)
    ov = pipe.config.vae.overrides
    cache = latent_lib.LatentCache(cache_dir)
    if cache.native:
        raise UserError(f"--workdir {workdir}: a mixed-shape latent cache; probe a fixed-shape run")
    if "latents_mean" in ov:
        cache.normalize(np.asarray(ov["latents_mean"], np.float32), np.asarray(ov["latents_std"], np.float32))
    window = pipe.latent_shape(pipe.defaults["frames"], pipe.defaults["height"], pipe.defaults["width"])[0]
    rng = np.random.default_rng(seed)
    picked = []
    for i in rng.permutation(len(cache)):
        ex = cache[int(i)]
        c = ex["caption"]
        if " and " not in c and "moves" in c and swap_color(c) != c:
            picked.append(ex)
            if len(picked) == clips:
                break
    if not picked:
        raise UserError(f"--workdir {workdir}: no single-object moving world captions in its latent cache")
    x0 = jnp.asarray(np.stack([e["latents"][:window] for e in picked]))
    caps = [e["caption"] for e in picked]
    b, t = x0.shape[0], x0.shape[1]
    ph, pw = pipe.dit_cfg.patch_size[1:]
    per_frame = (x0.shape[2] // ph) * (x0.shape[3] // pw)
    model = nnx.merge(pipe.graphdef, pipe.state)
    noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape, x0.dtype)
    start = jnp.ones((b,), bool)
    variants = {"true": caps, "colour swapped": [swap_color(c) for c in caps],
                "direction swapped": [swap_direction(c) for c in caps], "empty": [""] * b}
    rows = []
    for setting in ("t2v", "i2v"):
        given = jnp.zeros((b, t), bool).at[:, 0].set(setting == "i2v")
        for name, cs in variants.items():
            ids, mask = pipe.encode_prompts(cs)
            kv = model.text_kv(model.encode_text(ids, mask))
            for s in sigmas:
                s_frame = jnp.where(given, 0.0, s).astype(x0.dtype)  # (B, t): given frames at level 0
                xt = flow.add_noise(x0, noise, s_frame)
                sig = conditioning.token_levels(jnp.full((b,), s, x0.dtype), given, per_frame)
                v = model.velocity(xt, sig, None, text_kv=kv, start=start)
                x0_hat = xt - s_frame[:, :, None, None, None] * v  # x_sigma = x0 + sigma * v
                err = np.asarray(((x0_hat - x0) ** 2).mean(axis=(0, 2, 3, 4)))
                rows.append(dict(setting=setting, caption=name, sigma=float(s),
                                 x0_mse_by_frame=[round(float(e), 4) for e in err]))
    return {"workdir": os.path.abspath(workdir), "clips": b, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['clips']} clips of {result['workdir']}: x0 MSE per latent frame (frame 0 given clean in i2v)",
             f"{'setting':8s} {'caption':18s} {'sigma':>5s}  x0 MSE by latent frame  (vs true)"]
    true = {(r["setting"], r["sigma"]): r["x0_mse_by_frame"] for r in result["rows"] if r["caption"] == "true"}
    for r in result["rows"]:
        ref = true[(r["setting"], r["sigma"])]
        d = " ".join(f"{a - b_:+.4f}" for a, b_ in zip(r["x0_mse_by_frame"], ref))
        lines.append(f"{r['setting']:8s} {r['caption']:18s} {r['sigma']:5.2f}  "
                     f"{' '.join(f'{e:.4f}' for e in r['x0_mse_by_frame'])}  ({d})")
    return "\n".join(lines)


def _main(argv) -> int:
    a = parse_args(argv)
    try:
        sigmas = tuple(float(s) for s in a.sigmas.split(","))
    except ValueError:
        raise UserError(f"--sigmas {a.sigmas!r}: give comma-separated numbers, e.g. 0.5,0.8,0.95") from None
    if a.clips < 1:
        raise UserError(f"--clips {a.clips}: must be >= 1")
    result = probe(a.workdir, a.clips, sigmas, a.seed)
    print(table(result))
    if a.out:
        fileio.write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(_main))

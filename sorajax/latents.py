"""The DiT stage's latent cache: every training clip encoded once by the frozen VAE.

RUN/latents/train.npy holds the latent means (N, t, h, w, z) float32 and RUN/latents/train.json
the captions of the same clips and a fingerprint of what made them (the data settings, the VAE's
weights and config). A cache whose fingerprint differs from the run's (another data seed, size,
frame count, clip count or VAE) is rebuilt, never paired with other captions.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from sorajax import fileio, sharding
from sorajax.data import builders
from sorajax.data.pipeline import decode_example


class LatentSource:
    """Random-access {"latents", "caption"} examples held in memory (no per-step decoding)."""

    def __init__(self, latents: np.ndarray, captions: list[str]):
        if len(latents) != len(captions):
            raise ValueError(f"{len(latents)} latents for {len(captions)} captions")
        self.latents = latents  # (N, t, h, w, z) float32
        self.captions = captions

    def normalize(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-channel (x - mean) / std, as the DiT sees Wan's latents."""
        self.latents = (self.latents - mean) / std

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"latents": np.asarray(self.latents[i], np.float32), "caption": self.captions[i]}


def fingerprint(config, num_clips: int, vae_provenance: str) -> dict:
    """What the cached latents depend on. The latent statistics written into vae.overrides by
    normalize_latents are left out: they are measured from these latents."""
    vae = {k: v for k, v in config.vae.overrides.items() if k not in ("latents_mean", "latents_std")}
    fp = {"data": {k: v for k, v in config.data.to_dict().items() if k != "data_dir"},
          "num_clips": int(num_clips), "vae_variant": config.vae.variant,
          "vae_overrides": json.loads(json.dumps(vae, default=list)), "vae": vae_provenance}
    if config.data.source == "folder":  # a re-prepared folder: its name carries a content digest
        fp["dataset"] = os.path.basename(os.path.dirname(builders.folder_path(config.data.dir)))
    return fp


def _key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def cached_latents(config, run_dir: str, mesh, source, vae_provenance: str, load_vae) -> LatentSource:
    """The latents of every clip of `source` with their captions, from RUN/latents when that
    cache was made from the same data and VAE, else encoded now (and cached by process 0).
    `vae_provenance` names the VAE weights; `load_vae() -> (graphdef, state)` loads them."""
    fp = fingerprint(config, len(source), vae_provenance)
    npy = os.path.join(run_dir, "latents", "train.npy")
    meta = os.path.join(run_dir, "latents", "train.json")
    if os.path.exists(meta) and os.path.exists(npy):
        with open(meta) as f:
            saved = json.load(f)
        if saved.get("key") == _key(fp):
            return LatentSource(np.load(npy), saved["captions"])
        print(f"latent cache {npy} was made from other data or another VAE "
              f"({_diff(saved.get('fingerprint', {}), fp)}); rebuilding it", flush=True)
    graphdef, state = load_vae()
    lat = encode(graphdef, state, source, mesh, config.sharding_rules)
    caps = builders.captions(source)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(npy), exist_ok=True)
        fileio.save_npy(npy, lat)  # the .json, written last, is what marks the cache complete
        fileio.write_json(meta, {"key": _key(fp), "fingerprint": fp, "captions": caps})
    return LatentSource(lat, caps)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if "data" in keys and isinstance(old.get("data"), dict):
        keys = [k for k in keys if k != "data"] + [
            f"data.{k}" for k in sorted(set(old["data"]) | set(new["data"]))
            if old["data"].get(k) != new["data"].get(k)]
    return "changed: " + ", ".join(keys) if keys else "unknown format"


def encode(graphdef, state, source, mesh, rules, batch_size: int = 32) -> np.ndarray:
    """VAE latent means of every clip of `source`, (N, t, h, w, z) float32, in fixed-size
    batches (one compile); the VAE's activations follow the rules (row-sharded over context)."""
    rules = sharding.normalize_rules(rules)

    def enc(st, x):  # traced under the rules
        with sharding.activation_rules(mesh, rules):
            return nnx.merge(graphdef, st).encode(x)[0]

    # Replicated output: readable by every process of a multi-process run.
    fn = jax.jit(enc, out_shardings=sharding.replicated(mesh))
    n, out = len(source), []
    for i in tqdm(range(0, n, batch_size), desc="encode latents", unit="batch",
                  disable=jax.process_index() != 0):
        ex = [decode_example(source[j])["frames"] for j in range(i, min(i + batch_size, n))]
        x = np.stack(ex + [ex[-1]] * (batch_size - len(ex)))  # (B, T, H, W, 3)
        out.append(np.asarray(fn(state, x))[:len(ex)])
    return np.concatenate(out).astype(np.float32)

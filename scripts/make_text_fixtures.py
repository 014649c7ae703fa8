"""Builds tests/fixtures/umt5_tiny/: a tiny random UMT5 encoder, a Wan-style tokenizer folder and
reference outputs computed by transformers exactly as diffusers' WanPipeline does it.

Run with the PyTorch reference environment (torch, transformers, sentencepiece, tokenizers):

    /work/torchvenv/bin/python scripts/make_text_fixtures.py [--out tests/fixtures/umt5_tiny]

Writes:
  text_encoder/           UMT5EncoderModel.save_pretrained (config.json, model.safetensors)
  tokenizer/              spiece.model + tokenizer.json + tokenizer_config.json (both formats, as
                          diffusers-format Wan checkpoints ship google/umt5-xxl's tokenizer)
  t5_text_encoder/        a tiny T5EncoderModel (T5-style: position bias in layer 0 only)
  io.npz                  prompts, ids, mask, last_hidden_state (+ t5_), Wan-style zero-padded
                          prompt_embeds, max_length, umt5_xxl_param_count (counted on the meta
                          device), spm_only_ids (transformers loading spiece.model alone),
                          rel_buckets (T5 bucket of each relative position in [-400, 400])
"""
from __future__ import annotations

import argparse
import html
import io
import json
import pathlib
import re
import shutil

import numpy as np

MAX_LENGTH = 16

# Real prompts: varied length, one far longer than MAX_LENGTH, punctuation, html entities,
# repeated / odd whitespace, characters outside the toy vocabulary, special tokens typed in the
# text (transformers matches them), and the empty negative prompt.
PROMPTS = [
    "A red ball rolls across a wooden table.",
    "A cat.",
    "Blue  car &amp; tree!",
    "The cat &amp; the dog play   in the  park at sunset, while two small birds fly above the calm blue sea.",
    "  Two birds fly over the calm sea!  ",
    "A man walks his dog &quot;Rex&quot; slowly &#8212; then runs.",
    "\u03a9 night sky with stars \u2606\u2606",
    "a\tblue\ncar drives fast",
    "a cat </s> the dog<pad>x",
    "",
]

# Captions the fixture's sentencepiece vocabulary is trained on.
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
_THINGS = ["ball", "cat", "dog", "car", "bird", "man", "woman", "cube", "boat", "tree"]
_ACTS = ["rolls across", "jumps over", "walks through", "drives along", "flies above", "sits on"]
_PLACES = ["a wooden table", "the park", "the calm sea", "a busy street", "the night sky", "a fence"]


def captions():
    out = []
    for i in range(240):
        c, t, a, p = (_COLORS[i % 8], _THINGS[(i * 3) % 10], _ACTS[(i * 5) % 6], _PLACES[(i * 7) % 6])
        s = f"A {c} {t} {a} {p}"
        s += [".", ", slowly.", "!", " at sunset.", ", then stops.", " while it rains."][i % 6]
        out.append(s if i % 4 else s.lower())
    out += ["The cat & the dog play.", "Two small birds fly; \"Rex\" runs, then smiles."]
    return out


def prompt_clean(text):
    # diffusers.pipelines.wan.pipeline_wan.prompt_clean; ftfy is not installed in either env.
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def build_tokenizer(tok_dir: pathlib.Path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions()), model_writer=buf, model_type="unigram", vocab_size=200,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    spm_only = tok_dir.parent / "_spm_only"
    spm_only.mkdir(parents=True, exist_ok=True)
    (spm_only / "spiece.model").write_bytes(buf.getvalue())
    # extra_ids=0: every id comes from spiece.model, so both formats have the same vocabulary.
    tok = T5Tokenizer.from_pretrained(str(spm_only), extra_ids=0)
    tok.save_pretrained(str(tok_dir))  # tokenizer.json + tokenizer_config.json
    shutil.copy(spm_only / "spiece.model", tok_dir / "spiece.model")
    return spm_only


def hf_encode(tok, prompts):
    # WanPipeline._get_t5_prompt_embeds, verbatim arguments.
    r = tok([prompt_clean(p) for p in prompts], padding="max_length", max_length=MAX_LENGTH,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return r.input_ids, r.attention_mask


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests/fixtures/umt5_tiny"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    import torch
    from transformers import (AutoTokenizer, T5Config, T5EncoderModel, T5Tokenizer, UMT5Config,
                              UMT5EncoderModel)

    torch.manual_seed(0)
    spm_only = build_tokenizer(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))  # what WanPipeline loads
    ids, mask = hf_encode(tok, PROMPTS)
    spm_ids, _ = hf_encode(T5Tokenizer.from_pretrained(str(spm_only), extra_ids=0), PROMPTS)
    shutil.rmtree(spm_only)
    print("vocab", len(tok), "| spiece-only transformers ids equal tokenizer.json ids:",
          bool((spm_ids == ids).all()))

    vocab = -(-len(tok) // 64) * 64  # padded like umt5-xxl's 256384 > its tokenizer
    cfg = UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", scalable_attention=True)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        # Random-init layer norms are ones: perturb them so the test sees the scales are loaded.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(str(out / "text_encoder"))
        hidden = model(ids, mask).last_hidden_state  # (B, L, D)
        rel = torch.arange(-400, 401)
        buckets = model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel)
    # WanPipeline: keep each prompt's first seq_len embeddings, zero the rest.
    seq_lens = mask.gt(0).sum(dim=1).long()
    embeds = torch.stack([torch.cat([u[:v], u.new_zeros(MAX_LENGTH - v, u.size(1))])
                          for u, v in zip(hidden, seq_lens)])

    # T5 (v1.1-style, one shared position-bias table) on the same ids: the "toy" variant's family.
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu")).eval()
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        t5.save_pretrained(str(out / "t5_text_encoder"))
        t5_hidden = t5(ids, mask).last_hidden_state  # (B, L, D)

    # umt5-xxl parameter count (Wan 2.1's text encoder config), without allocating.
    xxl = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                     num_heads=64, feed_forward_proj="gated-gelu", scalable_attention=True)
    with torch.device("meta"):
        big = UMT5EncoderModel(xxl)
    n_xxl = sum(p.numel() for p in big.parameters())  # shared/encoder.embed_tokens counted once
    print("umt5-xxl params", n_xxl)

    np.savez(out / "io.npz", prompts=np.array(PROMPTS), ids=ids.numpy().astype(np.int32),
             mask=mask.numpy().astype(np.int32), last_hidden_state=hidden.numpy(),
             prompt_embeds=embeds.numpy(), t5_last_hidden_state=t5_hidden.numpy(), max_length=np.int32(MAX_LENGTH),
             umt5_xxl_param_count=np.int64(n_xxl), spm_only_ids=spm_ids.numpy().astype(np.int32),
             rel_positions=rel.numpy(), rel_buckets=buckets.numpy())
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e3:.0f} kB)")
    print(json.dumps({"ids": ids.tolist()}))


if __name__ == "__main__":
    main()

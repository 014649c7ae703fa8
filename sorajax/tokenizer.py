"""Sentencepiece tokenizer: train a toy vocabulary, load real ones, encode exactly like Wan.

Two on-disk formats load:
  * a sentencepiece ``.model`` file (or a folder holding ``spiece.model``), run by the
    ``sentencepiece`` library;
  * a folder holding ``tokenizer.json`` (how diffusers-format Wan checkpoints ship
    google/umt5-xxl's tokenizer), run by the ``tokenizers`` library -- the same backend that
    transformers' ``T5Tokenizer`` uses, so ids match the reference bit for bit.
A folder with both uses ``tokenizer.json`` (that is what transformers' AutoTokenizer picks).

``Tokenizer.encode`` reproduces ``WanPipeline._get_t5_prompt_embeds``'s text handling:
``prompt_clean`` (html-unescape twice, collapse whitespace, strip), then the HF call with
``padding="max_length", truncation=True, add_special_tokens=True``: ids get ``</s>`` appended;
a prompt that is too long keeps its first ``max_length - 1`` tokens and still ends in ``</s>``;
padding is ``pad_id`` with mask 0. Deviation: ftfy is not installed here, so ftfy's mojibake
repair (``ftfy.fix_text``) is not applied; the pipeline only applies it when ftfy is present.

Conventions are T5's: pad=0, eos=1 (``</s>``), unk=2, no bos.
"""
from __future__ import annotations

import html
import io
import os
import pathlib
import re
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from sorajax import fileio

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Prompt cleaning (diffusers' wan pipelines: basic_clean + whitespace_clean, minus ftfy).
# ----------------------------------------------------------------------------------------------
def prompt_clean(text: str) -> str:
    """WanPipeline's ``prompt_clean`` without ftfy: html-unescape twice, collapse whitespace."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------
# Training (toy vocabularies from a dataset's captions).
# ----------------------------------------------------------------------------------------------
def train_tokenizer(captions: Iterable[str], model_prefix_or_path, vocab_size: int = 256,
                    model_type: str = "bpe") -> str:
    """Trains a sentencepiece model in-process; returns the path of the ``.model`` file.

    BPE by default: on small templated caption sets (the synthetic world's grammar has ~40
    words) sentencepiece's unigram trainer prunes down to characters (52 pieces, 30 tokens per
    caption), while BPE learns the words (11 tokens per caption).

    T5 conventions (pad=0, eos=1, unk=2, no bos). ``hard_vocab_limit=False`` makes ``vocab_size``
    an upper bound, so tiny caption sets never fail; ``num_threads=1`` and no sampling keep it
    deterministic. The model is written to a temporary name and renamed (no partial file, no
    ``.vocab`` side file).
    """
    import sentencepiece as spm

    path = str(model_prefix_or_path)
    if not path.endswith(".model"):
        path += ".model"
    # Materialise (and clean like encode() does) so training sees what encoding will see.
    sentences = [prompt_clean(c) for c in captions]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("train_tokenizer: no non-empty captions")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type=model_type,
        vocab_size=int(vocab_size),
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        input_sentence_size=0,  # use every sentence: no random sampling
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fileio.write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------
# Loading and encoding.
# ----------------------------------------------------------------------------------------------
class Encoded(NamedTuple):
    ids: np.ndarray  # (B, L) int32
    mask: np.ndarray  # (B, L) int32, 1 = real token (incl. </s>), 0 = padding
    truncated: bool  # any prompt lost tokens to max_length (the CLI warns)


class Tokenizer:
    """A T5-style tokenizer over either backend; see the module docstring."""

    def __init__(self, backend, kind: str, path: str):
        self._backend = backend
        self.kind = kind  # "sentencepiece" | "tokenizers"
        self.path = path
        self._special_re = None
        if kind == "sentencepiece":
            # transformers matches special tokens (</s>, <pad>, <unk>) inside the text; plain
            # sentencepiece would spell them out piece by piece. Split on them like it does.
            specials = [backend.id_to_piece(i) for i in range(backend.get_piece_size())
                        if backend.is_control(i) or backend.is_unknown(i)]
            specials = sorted((s for s in specials if s), key=len, reverse=True)
            if specials:
                self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
            self.vocab_size = int(backend.get_piece_size())
            self.pad_id = int(backend.pad_id())
            self.eos_id = int(backend.eos_id())
            self.unk_id = int(backend.unk_id())
        else:
            self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
            self.pad_id = _token_id(backend, "<pad>", PAD_ID)
            self.eos_id = _token_id(backend, "</s>", EOS_ID)
            self.unk_id = _token_id(backend, "<unk>", UNK_ID)
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: tokenizer has no pad or eos token (pad={self.pad_id}, eos={self.eos_id})")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        p = pathlib.Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "spiece.model").is_file():
                p = p / "spiece.model"
            else:
                raise FileNotFoundError(f"{path}: no tokenizer.json or spiece.model in folder")
        if not p.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        if p.suffix == ".json":
            import tokenizers

            backend = tokenizers.Tokenizer.from_file(str(p))
            # We pad/truncate ourselves; do not inherit settings stored in the file.
            backend.no_padding()
            backend.no_truncation()
            return cls(backend, "tokenizers", str(p))
        import sentencepiece as spm

        return cls(spm.SentencePieceProcessor(model_file=str(p)), "sentencepiece", str(p))

    # -- pieces ---------------------------------------------------------------------------------
    def _content_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of cleaned texts, without special tokens."""
        if self.kind == "tokenizers":
            encs = self._backend.encode_batch(texts, add_special_tokens=False)
            return [list(e.ids) for e in encs]
        if self._special_re is None:
            return [list(x) for x in self._backend.encode(texts, out_type=int)]
        out = []
        for text in texts:
            row = []
            for i, chunk in enumerate(self._special_re.split(text)):
                if i % 2:  # a special token matched verbatim
                    row.append(int(self._backend.piece_to_id(chunk)))
                elif chunk:
                    row += self._backend.encode(chunk, out_type=int)
            out.append(row)
        return out

    def tokenize(self, text: str) -> list[int]:
        """Ids of one cleaned prompt followed by </s> (no padding, no truncation)."""
        return self._content_ids([prompt_clean(text)])[0] + [self.eos_id]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)]
        if self.kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._backend.decode(ids)

    def encode(self, texts, max_length: int) -> Encoded:
        """Wan-exact ids/mask: clean, tokenize, keep max_length-1 tokens, append </s>, pad.

        Returns ``Encoded(ids, mask, truncated)``; it unpacks as a tuple, so
        ``ids, mask, _ = tok.encode(...)`` and ``enc.ids`` both work.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        rows = self._content_ids([prompt_clean(t) for t in texts])
        ids = np.full((len(rows), max_length), self.pad_id, np.int32)  # (B, L)
        mask = np.zeros((len(rows), max_length), np.int32)  # (B, L)
        truncated = False
        for b, row in enumerate(rows):
            # HF truncates the content to leave room for the special token, so a truncated
            # prompt still ends with </s>.
            if len(row) > max_length - 1:
                truncated = True
                row = row[: max_length - 1]
            row = row + [self.eos_id]
            ids[b, : len(row)] = row
            mask[b, : len(row)] = 1
        return Encoded(ids, mask, truncated)


def _token_id(backend, token: str, default: int) -> int:
    i = backend.token_to_id(token)
    return default if i is None else int(i)

"""Stage 1: prompt -> umT5 embeddings [512, d_model], the way the reference pipelines do it.

Official `wan/modules/tokenizers.py` (clean='whitespace') and diffusers `WanPipeline` both:
ftfy-fix + double html-unescape + collapse whitespace; tokenize with the EOS post-processor,
truncate to 512 tokens; run the encoder with the attention mask; keep the real rows and
zero-pad to 512. Padded keys are masked, so running at the real length gives the same rows.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ftfy  # tiny, pure Python: the official cleaner fixes mojibake with it, so do we
import numpy as np
from vidrt.backends.base import Engine
from vidrt.errors import PackageError, UsageError, arg
from vidrt.package.contracts import ATTENTION_MASK, INPUT_IDS, TEXT_HIDDEN


def clean_prompt(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Tokens:
    ids: np.ndarray  # [num_tokens] int64, EOS included
    truncated: bool
    unknown_words: tuple[str, ...]  # words the tokenizer mapped to its unknown token


class PromptTokenizer:
    """`tokenizers` over the package's tokenizer.json (no transformers in the runtime)."""

    def __init__(self, path: Path, text_len: int) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise PackageError(f"{path} is not a valid tokenizer.json ({exc}); re-export the package") from None
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=text_len)
        self.text_len = text_len
        self._unk_id = self._unknown_id()

    def _unknown_id(self) -> int | None:
        for token in ("<unk>", "[UNK]"):
            idx = self._tok.token_to_id(token)
            if idx is not None:
                return idx
        return None

    def __call__(self, prompt: str) -> Tokens:
        full = self._tok.encode(prompt)
        truncated = bool(full.overflowing)
        ids = np.asarray(full.ids, dtype=np.int64)
        unknown: list[str] = []
        if self._unk_id is not None:
            for token_id, (start, end) in zip(full.ids, full.offsets, strict=True):
                if token_id == self._unk_id:
                    unknown.append(prompt[start:end])
        return Tokens(ids=ids, truncated=truncated, unknown_words=tuple(unknown))


def encode_prompts(encoder: Engine, tokenizer: PromptTokenizer, prompts: list[str],
                   warn: Callable[[str], None], names: tuple[str, ...] = ("prompt", "negative prompt"),
                   clean: bool = True) -> np.ndarray:
    """-> [len(prompts), text_len, d_model] float32: each prompt's real rows, zero rows after.
    names: what warnings call each prompt; clean=False: the prompts are cleaned already (Settings)."""
    out: list[np.ndarray] = []
    for i, prompt in enumerate(prompts):
        toks = tokenizer(clean_prompt(prompt) if clean else prompt)
        if toks.truncated:
            name = names[i] if i < len(names) else f"prompt {i + 1}"
            warn(f"the {name} is longer than {tokenizer.text_len} tokens; it was truncated to {tokenizer.text_len}")
        ids = toks.ids[None, :]  # [1, seq]: the encoder runs at the real token length
        hidden = encoder.run({INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids)})[TEXT_HIDDEN]
        padded = np.zeros((tokenizer.text_len, hidden.shape[-1]), dtype=np.float32)
        padded[: ids.shape[1]] = hidden[0]
        out.append(padded)
    return np.stack(out)


def check_prompt(prompt: str, what: str = "prompt") -> None:
    if not prompt or not prompt.strip():
        raise UsageError(f"the {what} is empty; pass some words, e.g. {arg('prompt', 'a red circle moving left')}")

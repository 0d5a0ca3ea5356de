"""Word-level tokenizer for the tiny "moving shapes" model, built with `tokenizers`.

Vocabulary: <pad>=0, </s>=1, <unk>=2, then the words of the prompt grammar ("a", colours,
shapes, "moving", directions). Lowercased; split on whitespace, punctuation dropped; every
encoding ends with </s> (TemplateProcessing), like the umT5 tokenizer the runtime expects.
Unknown words map to <unk>.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from vidrt.export.shapes_data import WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TEXT_LEN = 512


def build_tokenizer() -> Tokenizer:
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # split on whitespace, drop punctuation ("a red circle, moving left." == "a red circle moving left")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="removed")])
    tok.post_processor = TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    tok.add_special_tokens([PAD, EOS, UNK])
    return tok


def save_tokenizer(folder: Path) -> Tokenizer:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (loadable by
    transformers' AutoTokenizer / PreTrainedTokenizerFast and by `tokenizers` alone)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    specials = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": TEXT_LEN,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return tok


__all__ = ["PAD", "EOS", "UNK", "TEXT_LEN", "build_tokenizer", "save_tokenizer"]

"""Random-weight tiny models of the real architecture, for tests and benchmarks (torch world)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def randomise_(module: Any, seed: int) -> Any:
    """Every parameter random, in place. At initialisation heads and modulations are zeros/ones, so a
    key map that dropped or swapped them would go unnoticed and outputs can be near-constant (a PSNR
    would then mean nothing). Norm scales near 1, matrices ~ 1/sqrt(fan_in)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim >= 2 and "embedding" not in name and "modulation" not in name:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * r if p.ndim == 1 else 0.5 * r)
    return module.eval()


def write_word_tokenizer(folder: Path, words: Sequence[str], model_max_length: int = 512) -> int:
    """A T5-like Unigram tokenizer over `words` + single letters (<pad>=0, </s>=1, <unk>=2, Metaspace,
    '</s>' appended), loadable by `tokenizers` and by transformers' AutoTokenizer. -> vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>", "▁", *(f"▁{w}" for w in words), *"abcdefghijklmnopqrstuvwxyz"]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": model_max_length}))
    return len(pieces)

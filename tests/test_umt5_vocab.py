"""The real umT5 vocabulary (google/umt5-xxl, 256,300 pieces), not a vocabulary made by the tests.

Source: the `stable-diffusion-cpp-python==0.4.7` sdist on PyPI ships it as a C byte array holding a
Hugging Face tokenizer.json (`vendor/stable-diffusion.cpp/src/tokenizers/vocab/umt5.hpp`). It is
fetched once with `pip download` (sdist only, no dependencies, nothing built or installed) and cached
(VIDRT_TEST_DATA, default ~/.cache/vidrt-test); without network and cache the tests skip.

That JSON lacks the original's normaliser (sentencepiece's nmt_nfkc Precompiled charsmap; only the
`Replace {2,} -> " "` step is kept). Both sides below read the same file, so the comparison is of
vidrt's tokenizer path against the official one; `test_where_the_missing_nfkc_normaliser_matters`
measures which inputs an NFKC normaliser would tokenise differently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

SDIST = "stable-diffusion-cpp-python==0.4.7"
MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/umt5.hpp"
# wan/configs/shared_config.py sample_neg_prompt (the official default negative prompt)
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
PROMPTS = {
    "wan negative (Chinese)": WAN_NEGATIVE,
    "English": "A cat surfing a wave at sunset, cinematic lighting, 4k",
    "long English (cut at 512)": " ".join(["a red circle moving left on a blue background"] * 80),
    "long Chinese (cut at 512)": WAN_NEGATIVE * 8,
    "emoji": "a cat 🐱 surfing 🌊 at sunset 🌅, happy 😀👍🏽",
    "full-width": "ＡＢＣ ｆｕｌｌ－ｗｉｄｔｈ　ｔｅｘｔ １２３！ and ｶﾀｶﾅ",
    "HTML entities": "a red circle &amp; moving &lt;left&gt; &#39;quoted&#39; &amp;amp; &nbsp;done",
    "mixed whitespace": "  a\tcat\n\n  walks   on  the beach  ",
    "compatibility characters": "x² + y³, ①② steps, 5㎏, chapter Ⅳ, wait… ™ ½ cup, 𝐁𝐨𝐥𝐝",
}


def _cache_dir() -> Path:
    return Path(os.environ.get("VIDRT_TEST_DATA", Path.home() / ".cache" / "vidrt-test")) / "umt5-vocab"


@pytest.fixture(scope="session")
def umt5_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer folder (tokenizer.json + tokenizer_config.json), as a diffusers Wan checkpoint has."""
    cache = _cache_dir()
    json_path = cache / "tokenizer.json"
    if not json_path.is_file():
        work = tmp_path_factory.mktemp("sdist")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               SDIST, "-d", str(work)], capture_output=True, text=True, timeout=900)
        archives = list(work.glob("*.tar.gz"))
        if done.returncode or not archives:
            pytest.skip(f"cannot fetch {SDIST} from PyPI (offline?): {done.stderr.strip()[-200:]}")
        with tarfile.open(archives[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(MEMBER))
            source = tar.extractfile(member).read().decode("ascii")  # type: ignore[union-attr]
        body = source[source.index("{") + 1:source.rindex("}")]
        data = bytes.fromhex(re.sub(r"0x|[,\s]", "", body)).rstrip(b"\0")
        json.loads(data)  # a whole JSON document, or fail here
        cache.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, json_path)
    folder = tmp_path_factory.mktemp("umt5-tokenizer")
    shutil.copy(json_path, folder / "tokenizer.json")
    # what google/umt5-xxl's tokenizer_config.json says that matters here: the fast T5 tokenizer, its
    # special tokens; the <extra_id_*> pieces are already in tokenizer.json's added tokens
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5TokenizerFast", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 0, "model_max_length": 512}))
    return folder


@pytest.fixture(scope="session")
def exported_tokenizer(umt5_tokenizer_dir, tiny_t2v_checkpoint, tmp_path_factory):
    """The tokenizer stage of `vidrt export` on a checkpoint whose tokenizer folder holds the real
    vocabulary, read back by the runtime (vidrt.text.PromptTokenizer), as a package's tokenizer is."""
    from tiny import TINY_VARIANT
    from vidrt.export.checkpoints import open_checkpoint
    from vidrt.export.package import TOKENIZER_FILE, closed_vocabulary
    from vidrt.text import PromptTokenizer

    root = tmp_path_factory.mktemp("ckpt-real-vocab") / "ckpt"
    shutil.copytree(tiny_t2v_checkpoint, root, ignore=shutil.ignore_patterns("tokenizer"))
    shutil.copytree(umt5_tokenizer_dir, root / "tokenizer")
    text = open_checkpoint(root, TINY_VARIANT["t2v"]).tokenizer_json()
    assert closed_vocabulary(text) == ()  # 256k pieces: an open vocabulary, nothing listed in the manifest
    path = root.parent / TOKENIZER_FILE
    path.write_text(text, encoding="utf-8")
    return PromptTokenizer(path, 512)


@pytest.fixture(scope="module")
def official(umt5_tokenizer_dir: Path):
    """wan/modules/tokenizers.py HuggingfaceTokenizer as the official T5EncoderModel builds it."""
    import wan_ref  # the official `wan` package without its GPU-only imports

    tokenizers = wan_ref.load("modules.tokenizers")
    return tokenizers.HuggingfaceTokenizer(str(umt5_tokenizer_dir), seq_len=512, clean="whitespace")


def test_vocabulary_is_the_real_umt5(umt5_tokenizer_dir):
    data = json.loads((umt5_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "Unigram" and len(data["model"]["vocab"]) == 256300
    assert [t["content"] for t in data["added_tokens"][:3]] == ["<pad>", "</s>", "<s>"]


@pytest.mark.parametrize("name", list(PROMPTS))
def test_same_ids_and_mask_as_the_official_tokenizer(official, exported_tokenizer, name):
    """What the text encoder receives: vidrt's ids (cleaned, EOS, cut at 512) and all-ones mask over
    them (the rest is zero rows) == the official ids/mask over their real tokens, pad and 0 after."""
    from vidrt.text import clean_prompt

    ids, mask = official(PROMPTS[name], return_mask=True)
    ids, mask = ids[0].numpy(), mask[0].numpy()
    ours = exported_tokenizer(clean_prompt(PROMPTS[name]))
    n = int(mask.sum())
    assert ids.shape == mask.shape == (512,)
    assert np.array_equal(ours.ids, ids[:n]), f"{name}: first difference at {np.argmax(ours.ids != ids[:n])}"
    assert len(ours.ids) == n and np.all(mask[:n] == 1) and np.all(mask[n:] == 0) and np.all(ids[n:] == 0)
    assert ours.ids[-1] == 1  # </s>
    assert ours.truncated == ("cut at 512" in name) and (n == 512) == ("cut at 512" in name)


def test_where_the_missing_nfkc_normaliser_matters(exported_tokenizer, umt5_tokenizer_dir):
    """The original umT5 tokenizer normalises with NFKC (sentencepiece nmt_nfkc) before splitting; this
    vocabulary's JSON does not. Adding an NFKC normaliser shows which cleaned inputs that changes.
    Measured: only compatibility characters that ftfy (the official cleaning) leaves alone: superscripts,
    circled digits, unit and Roman-numeral signs, `…`, `™`, fractions, mathematical letters. Full-width
    letters and Wan's own negative prompt (full-width `，`) are the same: ftfy.fix_text already turns
    full-width forms into ASCII before tokenising. So with this vocabulary, vidrt and the official path
    agree everywhere, and both differ from google/umt5-xxl's own file only on such characters."""
    from tokenizers import Tokenizer, normalizers
    from vidrt.text import clean_prompt

    with_nfkc = Tokenizer.from_file(str(umt5_tokenizer_dir / "tokenizer.json"))
    with_nfkc.normalizer = normalizers.Sequence([normalizers.NFKC(), with_nfkc.normalizer])
    with_nfkc.no_padding()
    with_nfkc.enable_truncation(512)
    differs = {}
    for name, prompt in PROMPTS.items():
        text = clean_prompt(prompt)
        differs[name] = with_nfkc.encode(text).ids != list(exported_tokenizer(text).ids)
    print("NFKC changes the ids of:", sorted(k for k, v in differs.items() if v))
    assert differs["compatibility characters"]
    assert not any(v for k, v in differs.items() if k != "compatibility characters")

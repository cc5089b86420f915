"""One ``k`` validation (:func:`export.rest.check_k`) for the service's ``:retrieve``, the Python
API (``Retriever.search`` / ``retrieve``) and the ``micrec_tf.retrieve`` CLI: the same one-line
messages, written out by hand here. Fast: no export is loaded (a Retriever over 5 hand-made item
vectors, the CLI refusing before it loads anything).
"""
import os

import numpy as np
import pytest

from export import rest, server
from micrec_tf import cli
from micrec_tf.retrieval import Retriever
from conftest import ROOT

BAD = [
    (0, None, '"k" must be between 1 and 2000 (export.serve_max_k), got 0'),
    (-3, None, '"k" must be between 1 and 2000 (export.serve_max_k), got -3'),
    (2001, None, '"k" must be between 1 and 2000 (export.serve_max_k), got 2001'),
    (6, 5, '"k" must be between 1 and 5 (export.serve_max_k), got 6'),
    (True, None, '"k" must be an integer, got bool true'),
    (2.0, None, '"k" must be an integer, got number 2.0'),
    ("5", None, '"k" must be an integer, got string "5"'),
    (None, None, '"k" must be an integer, got null null'),
]


def _tiny_retriever() -> Retriever:
    """A Retriever's search state only (5 items, dimension 2, brute force, top_k 3)."""
    r = Retriever.__new__(Retriever)
    r.ids = ["a", "b", "c", "d", "e"]
    r.vectors = np.array([[1, 0], [0, 1], [2, 0], [1, 1], [-1, 0]], np.float32)
    r.row_of = {item: i for i, item in enumerate(r.ids)}
    r.searcher, r.index_params, r.top_k = None, None, 3
    return r


@pytest.mark.parametrize("k,max_k,message", BAD)
def test_check_k_messages(k, max_k, message):
    kwargs = {} if max_k is None else {"max_k": max_k}
    with pytest.raises(rest.RequestError) as err:
        rest.check_k(k, **kwargs)
    assert str(err.value) == message
    assert server.check_k is rest.check_k  # the server uses the same function


def test_check_k_accepts_the_range():
    assert rest.DEFAULT_MAX_K == 2000
    assert [rest.check_k(k) for k in (1, 7, 2000)] == [1, 7, 2000]
    assert rest.check_k(np.int64(4), 4) == 4 and type(rest.check_k(np.int64(4), 4)) is int


@pytest.mark.parametrize("k,max_k,message", [b for b in BAD if b[0] is not None])
def test_retriever_search_and_retrieve_refuse_bad_k(k, max_k, message):
    r = _tiny_retriever()
    kwargs = {} if max_k is None else {"max_k": max_k}
    with pytest.raises(ValueError) as err:
        r.search(np.ones((1, 2), np.float32), k, **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # checked before the requests are looked at
        r.retrieve([{"history": []}], k, **kwargs)
    assert str(err.value) == message


def test_retriever_search_valid_k_is_brute_force():
    r = _tiny_retriever()
    q = np.array([[1, 0.5]], np.float32)
    # scores by hand: a 1, b .5, c 2, d 1.5, e -1
    ids, scores = r.search(q, 2)
    assert ids.tolist() == [["c", "d"]]
    np.testing.assert_allclose(scores, [[2.0, 1.5]], rtol=1e-6)
    ids, _ = r.search(q)  # None: top_k (3)
    assert ids.tolist() == [["c", "d", "a"]]
    ids, _ = r.search(q, 5, max_k=5)
    assert ids.tolist() == [["c", "d", "a", "b", "e"]]


@pytest.mark.parametrize("k,message", [
    ("2001", 'error: --k: "k" must be between 1 and 2000 (export.serve_max_k), got 2001 '
            "(--debug shows the traceback)"),
])
def test_retrieve_cli_refuses_k_above_the_cap(k, message, capsys, tmp_path):
    from micrec_tf import retrieve

    code = cli.run(retrieve.main, ["--config", os.path.join(ROOT, "configs", "ml-100k.yaml"),
                                   "--export-dir", str(tmp_path), "--k", k])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert err.strip() == message

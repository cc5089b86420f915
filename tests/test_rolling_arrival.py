"""The rolling driver on items that arrive over time (issue 29, item 6): each window folder's
item file holds the items published before the folder's catalogue cut
(``experiments.rolling``: ``item_published.tsv``, :func:`~experiments.rolling.catalogue_cuts`).

References: pure-Python readings of ``item_published.tsv`` and of the raw click file (the cut's
boundaries recomputed from click ranks by hand: ``n0 = round(n / 2)``, then
``n0 + round(k (n - n0) / W)``, halves up), plain reads of the vocabularies.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import rolling
from test_rolling import FakeSteps
from tests.conftest import tiny_config


def _boundaries(times, windows):
    """The cut's boundaries by hand (module doc)."""
    ts = sorted(times)
    n = len(ts)
    n0 = (2 * n + 2) // 4  # round(n / 2), halves up
    return [ts[n0 + (2 * k * (n - n0) + windows) // (2 * windows)] for k in range(windows)]


def _published_before(data_dir, t):
    """Items of item_published.tsv published before ``t`` (plain reading)."""
    with open(os.path.join(data_dir, "item_published.tsv"), encoding="utf-8") as fh:
        rows = [ln.rstrip("\n").split("\t") for ln in fh.readlines()[1:]]
    return {i for i, p in rows if int(p) < t}


def _arrival_folder(tmp):
    """40 clicks (distinct times, one an hour) on 12 items, each published at or before its
    first click; items i10 and i11 are published late and never clicked; a header line and an
    unparseable line in the item file."""
    rng = np.random.default_rng(3)
    data = os.path.join(tmp, "raw")
    os.makedirs(data)
    times = [1_000_000 + 3600 * k for k in range(40)]
    items = [f"i{int(rng.integers(10))}" for _ in times]
    clicks = [(f"u{k % 5}", i, t) for k, (i, t) in enumerate(zip(items, times))]
    first = {}
    for _, i, t in clicks:
        first.setdefault(i, t)
    published = {f"i{k}": times[30] for k in range(10)}  # (an item nobody clicked)
    published.update({i: t - 100 * (int(i[1:]) % 3) for i, t in first.items()})
    published.update({"i10": times[28], "i11": times[-1] + 10})
    with open(os.path.join(data, "interactions.tsv"), "w") as fh:
        fh.write("user_id\titem_id\ttimestamp\n")
        fh.writelines(f"{u}\t{i}\t{t}\n" for u, i, t in reversed(clicks))
    with open(os.path.join(data, "items.tsv"), "w") as fh:
        fh.write("item_id\ttitle\ttags\tprovider\n")
        fh.write("not an item line\n")
        fh.writelines(f"i{k}\tItem {k}\tt{k % 3}\tp\n" for k in range(12))
    with open(os.path.join(data, "item_published.tsv"), "w") as fh:
        fh.write("item_id\tpublished\n")
        fh.writelines(f"{i}\t{p}\n" for i, p in sorted(published.items()))
    return data, clicks, published


def test_read_published_and_the_catalogue_cuts(tmp_path):
    data, clicks, published = _arrival_folder(str(tmp_path))
    assert rolling.read_published(data) == published
    assert rolling.read_published(str(tmp_path)) is None  # no file
    cut = rolling.cut_windows([t for *_, t in clicks], 3)
    b = _boundaries([t for *_, t in clicks], 3)
    assert list(cut.boundaries) == b
    assert rolling.catalogue_cuts(cut, 5000) == {1: b[1], 2: b[2], 3: 5001}
    for bad in ("i1\tx\n", "i1\n", "i1\t5\ni1\t6\n"):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "item_published.tsv").write_text("item_id\tpublished\n" + bad)
        with pytest.raises(rolling.cli.UsageError, match=r"item_published.tsv:\d: expected"):
            rolling.read_published(str(tmp_path / "bad"))


def _item_lines(folder):
    with open(os.path.join(folder, "items.tsv")) as fh:
        return fh.read().splitlines()


def test_driver_filters_each_folder_by_publication_and_signs_its_units(tmp_path):
    data, clicks, published = _arrival_folder(str(tmp_path))
    times = [t for *_, t in clicks]
    cfg = tiny_config(str(tmp_path), data={"dataset": "canonical", "data_dir": data},
                      train={"epochs": 30, "early_stopping_patience": 3})
    steps = FakeSteps(str(tmp_path))
    steps.counts = rolling.cut_windows(times, 3).counts
    kw = dict(windows=3, models=["ICAN"], lr_grid=(0.001,), out_dir=str(tmp_path / "res"),
              scratch=str(tmp_path / "scratch"), steps=steps, log=lambda *a: None)
    rolling.run_rolling(cfg, **kw)
    b = _boundaries(times, 3)
    cuts = {1: b[1], 2: b[2], 3: max(times) + 1}
    root = tmp_path / "scratch" / "data"
    with open(os.path.join(data, "items.tsv")) as fh:
        source = fh.read().splitlines()
    for name, k in [(f"upto-{k:02d}", k) for k in (1, 2, 3)] + [(f"pair-{k:02d}", k + 1)
                                                                  for k in (1, 2)]:
        folder = str(root / name)
        assert not os.path.islink(os.path.join(folder, "items.tsv"))
        want = _published_before(data, cuts[k])
        lines = _item_lines(folder)
        assert lines[:2] == source[:2]  # the header and the line that holds no item, kept
        assert {ln.split("\t")[0] for ln in lines[2:]} == want, name
        assert lines[2:] == [ln for ln in source[2:] if ln.split("\t")[0] in want]  # order kept
        with open(os.path.join(folder, "interactions.tsv")) as fh:  # every clicked item is there
            assert {ln.split("\t")[1] for ln in fh.read().splitlines()[1:]} <= want
    # not vacuous: the first folders lack items published later, the last has all but i11
    assert "i10" not in _published_before(data, cuts[1])
    assert "i10" in _published_before(data, cuts[2])
    assert _published_before(data, cuts[3]) == set(published) - {"i11"}
    unit = root.parent.parent / "res" / "runs" / "tiny-rolling" / "ican" / "seed0" / "initial.json"
    with open(unit) as fh:
        assert json.load(fh)["signature"]["items"] == "published"
    # published_filter=False: the item file linked, as without the file; the units run again
    n = len(steps.calls)
    rolling.run_rolling(cfg, published_filter=False, **kw)
    assert os.path.islink(root / "upto-01" / "items.tsv") and len(steps.calls) > n
    with open(unit) as fh:
        assert "items" not in json.load(fh)["signature"]


def test_an_item_without_a_publication_time_is_refused(tmp_path):
    data, clicks, _ = _arrival_folder(str(tmp_path))
    with open(os.path.join(data, "items.tsv"), "a") as fh:
        fh.write("i99\tItem 99\tt0\tp\n")
    cfg = tiny_config(str(tmp_path), data={"dataset": "canonical", "data_dir": data})
    with pytest.raises(rolling.cli.UsageError, match=r"items.tsv:15: item 'i99' has no "
                                                     r"publication time"):
        rolling.run_rolling(cfg, windows=3, models=["ICAN"], out_dir=str(tmp_path / "res"),
                            scratch=str(tmp_path / "scratch"), steps=FakeSteps(str(tmp_path)),
                            log=lambda *a: None)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("interactions.tsv", "items.tsv"):
        (plain / name).write_text((tmp_path / "raw" / name).read_text())
    with pytest.raises(rolling.cli.UsageError, match="no item_published.tsv"):
        rolling.run_rolling(cfg.replace({"data.data_dir": str(plain)}),
                            windows=3, published_filter=True, out_dir=str(tmp_path / "res"),
                            scratch=str(tmp_path / "s2"), steps=FakeSteps(str(tmp_path)),
                            log=lambda *a: None)


# ------------------------------------------------------------- the real preprocess (slow)

class PreprocessOnly:
    """The protocol's runs with the real preprocess (catalogue vocabularies; an update grows the
    previous step's artifacts, as the daily update does) and no training."""

    def __init__(self):
        self.units, self.calls = {}, []

    def _unit(self, cfg, kind, step, previous=""):
        from pipelines import preprocess

        cfg = cfg.replace({"name": f"{cfg.name}-{kind}{step}",
                           "preprocess.previous_artifacts": previous})
        preprocess.run(cfg, verbose=False)
        art = os.path.abspath(cfg.artifacts_dir)
        self.units[art] = (kind, step)
        self.calls.append((kind, step, art))
        return {"run_dir": art, "artifacts_dir": art, "version_dir": art,
                "seconds": {"total": 1.0}, "best_epoch": 1, "epochs_cap": 1}

    def initial(self, cfg):
        return self._unit(cfg, "initial", 0)

    def full(self, cfg):
        return self._unit(cfg, "full", int(cfg.name[-2:]))

    def update(self, cfg, window_dir, previous):
        s = int(os.path.basename(window_dir).split("-")[1])
        return self._unit(cfg.replace({"data.data_dir": window_dir}), "inc", s, previous)

    def evaluate(self, run_dir, eval_artifacts, new):
        return {"all": {"hit@10": 0.5, "hit@50": 0.5, "coverage@10": 0.5, "num_examples": 1},
                "new": {"hit@10": 0.5, "hit@50": 0.5, "coverage@10": 0.5, "num_examples": 1}}


@pytest.mark.slow
def test_tiny_arrival_world_catalogue_is_published_items_and_grows_append_only(tmp_path):
    cfg = tiny_config(str(tmp_path), data={"synthetic": {
        "num_users": 150, "num_items": 300, "num_events": 4000, "num_topics": 6, "seed": 3,
        "arrival": "news", "initial_item_share": 0.2}},
                      preprocess={"item_vocabulary": "catalogue"})
    steps = PreprocessOnly()
    rolling.run_rolling(cfg, windows=3, models=["ICAN"], lr_grid=(0.001,),
                        out_dir=str(tmp_path / "res"), scratch=str(tmp_path / "scratch"),
                        steps=steps, log=lambda *a: None)
    data = cfg.data.data_dir
    with open(os.path.join(data, "interactions.tsv")) as fh:
        times = [int(ln.split("\t")[2]) for ln in fh.read().splitlines()[1:]]
    b = _boundaries(times, 3)
    cuts = {1: b[1], 2: b[2], 3: max(times) + 1}

    def vocab(art):
        with open(os.path.join(art, "vocab", "item_id.txt")) as fh:
            return fh.read().split("\n")[:-1]

    # each step's artifacts: exactly the items published by its catalogue cut
    sizes = []
    for kind, step, art in steps.calls:
        k = 1 if kind == "initial" else step + 1
        want = _published_before(data, cuts[k])
        assert set(vocab(art)) == want and len(vocab(art)) == len(want), (kind, step)
        if kind != "full":
            sizes.append(len(want))
    # the incremental chain appends: every earlier vocabulary a prefix of the next
    chain = [art for kind, _, art in steps.calls if kind in ("initial", "inc")]
    assert [k for k, *_ in steps.calls if k in ("initial", "inc")] == ["initial", "inc", "inc"]
    for a, c in zip(chain, chain[1:]):
        assert vocab(c)[:len(vocab(a))] == vocab(a)
    # not vacuous: the catalogue grows at every step and starts well below the whole one
    with open(os.path.join(data, "items.tsv")) as fh:
        total = len(fh.read().splitlines()) - 1
    assert sizes[0] < sizes[1] < sizes[2] <= total and sizes[0] < 0.9 * total

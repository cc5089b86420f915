"""Append-only vocabularies (issue 29, item 1): ``preprocess.previous_artifacts``,
``pipelines.lineage`` (version id, ``lineage.json``, refusals).

References are plain reads of the files (the previous folder's vocabulary lines, read before the
second run) and pure-Python recounts of the raw TSVs written here: training clicks by the
global-time rule of :func:`test_catalogue_vocab.reference`, their counts per field, today's order
(count descending, then value), the set difference of old and new ids, and the version id
recomputed from its documented definition with hashlib.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import shutil

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.cli import user_error_message
from micrec_tf.config import ConfigError, from_dict
from pipelines import lineage, preprocess
from pipelines.vocab import append_order
from test_catalogue_vocab import reference
from test_preprocess import TsvAdapter, make_cfg

T0 = 1_600_000_000
DAY = 86400
FIELDS = ("item_id", "tag", "provider", "user_id", "user_gender", "user_age", "item_year")


# ------------------------------------------------------------------------------ raw data

def _old_items():
    rng = random.Random(5)
    return [(f"m{k:02d}", f"Old {k}", "|".join(rng.sample(["a", "b", "c", "d"], 2)),
             f"p{k % 3}", str(1990 + k % 4)) for k in range(30)]


def _new_items():
    # New tags, a new provider and new years; n06 and n07 are never clicked.
    return [(f"n{k:02d}", f"New {k}", "new1|a" if k % 2 else "new2", "pnew" if k < 4 else "p1",
             str(2020 + k % 2)) for k in range(8)]


def write_raw(root, items, users, events):
    with open(os.path.join(root, "items.tsv"), "w", encoding="utf-8") as fh:
        fh.write("item_id\ttitle\ttags\tprovider\tyear\n")
        fh.write("".join("\t".join(r) + "\n" for r in items))
    with open(os.path.join(root, "users.tsv"), "w", encoding="latin-1") as fh:
        fh.write("user_id\tgender\tage\n")
        fh.write("".join("\t".join(u) + "\n" for u in users))
    with open(os.path.join(root, "interactions.tsv"), "w", encoding="utf-8") as fh:
        fh.write("user_id\titem_id\ttimestamp\n")
        fh.write("".join(f"{u}\t{i}\t{t}\n" for u, i, t in events))


def make_phases(root1, root2):
    """Phase 1: clicks of days 0-10 on m00..m24 (m25..m29 in the item file, unclicked) by
    u00..u14. Phase 2 (the next window only): days 10-20, clicks on m10..m29 and n00..n05 by
    u05..u14 and the new users v00..v04 (a new gender value X, a new age 99): m00..m09 and
    u00..u04 have no click in it."""
    rng = random.Random(17)
    old_users = [(f"u{k:02d}", "MF"[k % 2], str(18 + k % 3)) for k in range(15)]
    new_users = [(f"v{k:02d}", "X" if k < 2 else "F", "99" if k % 2 else "18") for k in range(5)]
    ev1 = [(f"u{rng.randint(0, 14):02d}", f"m{rng.randint(0, 24):02d}",
            T0 + rng.randint(0, 10 * DAY)) for _ in range(300)]
    pool2 = [f"m{k:02d}" for k in range(10, 30)] + [f"n{k:02d}" for k in range(6)]
    users2 = [u[0] for u in old_users[5:] + new_users]
    ev2 = [(rng.choice(users2), rng.choice(pool2), T0 + 10 * DAY + rng.randint(1, 10 * DAY))
           for _ in range(300)]
    write_raw(root1, _old_items(), old_users, ev1)
    write_raw(root2, _old_items() + _new_items(), old_users + new_users, ev2)


def ref_counts(root):
    """{field: Counter(value -> training clicks)} and the item ids of the item file, recounted
    from the raw TSVs (max_tags 3: every test item has at most 2 distinct tags)."""
    item_ids, train, _, _ = reference(root, False)
    with open(os.path.join(root, "items.tsv"), encoding="utf-8") as fh:
        items = {r[0]: r for r in (line.rstrip("\n").split("\t") for line in fh)
                 if r[0] != "item_id"}
    with open(os.path.join(root, "users.tsv"), encoding="latin-1") as fh:
        users = {r[0]: r for r in (line.rstrip("\n").split("\t") for line in fh)
                 if r[0] != "user_id"}
    c = {f: collections.Counter() for f in FIELDS}
    for u, i, _ in train:
        c["user_id"][u] += 1
        c["user_gender"][users[u][1]] += 1
        c["user_age"][users[u][2]] += 1
        _, _, tags, provider, year = items[i]
        c["item_id"][i] += 1
        for t in dict.fromkeys(tags.split("|")):
            c["tag"][t] += 1
        c["provider"][provider] += 1
        c["item_year"][year] += 1
    return c, item_ids


def by_count(counter, values=None):
    values = counter if values is None else values
    return sorted(values, key=lambda v: (-counter[v], v))


def read_lines(art, name):
    with open(os.path.join(art, "vocab", name), encoding="utf-8") as fh:
        return fh.read().split("\n")[:-1]


def version_of(art):
    """The documented version id, recomputed: sha256 over sorted vocab/*.txt (name, NUL,
    byte length, NUL, bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(os.path.join(art, "vocab")) if n.endswith(".txt")):
        with open(os.path.join(art, "vocab", name), "rb") as fh:
            data = fh.read()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return "sha256:" + h.hexdigest()[:16]


# ------------------------------------------------------------------------------ fast

def test_config_key_defaults_to_no_previous_artifacts():
    assert from_dict({}).preprocess.previous_artifacts == ""
    assert from_dict({"preprocess": {"previous_artifacts": "artifacts/x"}}) \
        .preprocess.previous_artifacts == "artifacts/x"
    with pytest.raises(ConfigError, match="preprocess.previous_artifacts.*3"):
        from_dict({"preprocess": {"previous_artifacts": 3}})


def test_append_order_keeps_previous_lines_and_sorts_new_values():
    entries = [("z", 1), ("b", 5), ("new2", 3), ("new1", 3), ("c", 0), ("zz0", 0)]
    # b keeps line 2 (its count 5 would put it first), a (no click now) keeps line 1 with 0;
    # new values: new1 / new2 (3, by value), then the count-0 catalogue value zz0.
    assert append_order(["a", "b", "c", "z"], entries) == [
        ("a", 0), ("b", 5), ("c", 0), ("z", 1), ("new1", 3), ("new2", 3), ("zz0", 0)]
    # Without previous values: today's order.
    assert append_order([], entries) == [("b", 5), ("new1", 3), ("new2", 3), ("z", 1),
                                         ("c", 0), ("zz0", 0)]


def _fake_artifacts(root, stats=None, vocab=None, counts="3\n1\n", lineage_json=None):
    os.makedirs(os.path.join(root, "vocab"), exist_ok=True)
    st = {"dataset": "canonical", "adapter": "test_tsv", "items": 2, "items_in_table": 2}
    st.update(stats or {})
    with open(os.path.join(root, "stats.json"), "w") as fh:
        fh.write(st if isinstance(st, str) else json.dumps(st))
    files = {f: "" for f in FIELDS}
    files.update({"item_id": "m1\nm0\n", "tag": "a\nb\n"}, **(vocab or {}))
    for f, text in files.items():
        if text is not None:
            with open(os.path.join(root, "vocab", f + ".txt"), "w", encoding="utf-8") as fh:
                fh.write(text)
    with open(os.path.join(root, "vocab", "item_id_counts.txt"), "w") as fh:
        fh.write(counts)
    if lineage_json is not None:
        with open(os.path.join(root, "lineage.json"), "w") as fh:
            json.dump(lineage_json, fh)
    return str(root)


def _cfg(tmp_path, item_vocabulary="clicked"):
    return make_cfg(tmp_path / "out", tmp_path, item_vocabulary=item_vocabulary)


def test_read_previous_reads_lines_and_version(tmp_path):
    art = _fake_artifacts(tmp_path / "prev")
    prev = lineage.read_previous(art, _cfg(tmp_path), TsvAdapter())
    assert prev.vocabs["item_id"] == ("m1", "m0") and prev.vocabs["tag"] == ("a", "b")
    assert prev.vocabs["user_age"] == () and prev.generation == 0
    assert prev.version == version_of(art) == lineage.vocab_version(art)
    assert prev.sizes()["item_id"] == 3 and prev.sizes()["provider"] == 1
    # One byte more in any vocabulary file (the counts too) gives another version; a file
    # outside vocab/ does not count.
    with open(os.path.join(art, "notes.txt"), "w") as fh:
        fh.write("x")
    assert lineage.vocab_version(art) == prev.version
    with open(os.path.join(art, "vocab", "item_id_counts.txt"), "a") as fh:
        fh.write("0\n")
    assert lineage.vocab_version(art) != prev.version
    assert lineage.vocab_version(art) == version_of(art)


@pytest.mark.parametrize("kw, item_vocabulary, match", [
    ({"stats": {"dataset": "synthetic"}}, "clicked",
     "built with dataset 'synthetic', this run's is 'canonical'"),
    ({"stats": {"adapter": "ml-1m"}}, "clicked", "built with adapter 'ml-1m'"),
    ({"vocab": {"user_age": None}}, "clicked", r"schema .*missing \['user_age'\]"),
    ({"vocab": {"item_zip": "q\n"}}, "clicked", r"extra \['item_zip'\]"),
    ({"vocab": {"tag": "a\nb\na\n"}}, "clicked", r"vocab/tag.txt line 3 repeats line 1: 'a'"),
    ({"stats": {"items": 2, "items_in_table": 5}}, "catalogue",
     "item_vocabulary 'clicked', this run's is 'catalogue'"),
    ({"counts": "3\n0\n"}, "clicked", "item_vocabulary 'catalogue', this run's is 'clicked'"),
    ({"lineage_json": {"generation": 2, "item_vocabulary": "catalogue"}}, "clicked",
     "item_vocabulary 'catalogue'"),
])
def test_read_previous_refuses_in_one_line(tmp_path, kw, item_vocabulary, match):
    art = _fake_artifacts(tmp_path / "prev", **kw)
    with pytest.raises(lineage.PreviousArtifactsError, match=match) as err:
        lineage.read_previous(art, _cfg(tmp_path, item_vocabulary), TsvAdapter())
    msg = user_error_message(err.value)
    assert msg is not None and "\n" not in msg and art in msg


def test_read_previous_refuses_a_missing_or_unreadable_folder(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="previous_artifacts .*no such folder"):
        lineage.read_previous(str(tmp_path / "nowhere"), cfg, TsvAdapter())
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"not an artifacts folder \(no stats.json\)"):
        lineage.read_previous(str(tmp_path / "empty"), cfg, TsvAdapter())
    art = _fake_artifacts(tmp_path / "bad")
    with open(os.path.join(art, "stats.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ConfigError, match="cannot read stats.json: JSONDecodeError"):
        lineage.read_previous(art, cfg, TsvAdapter())
    art = _fake_artifacts(tmp_path / "latin")
    with open(os.path.join(art, "vocab", "provider.txt"), "wb") as fh:
        fh.write(b"\xff\n")
    with pytest.raises(ConfigError, match="cannot read vocab/provider.txt: UnicodeDecodeError"):
        lineage.read_previous(art, cfg, TsvAdapter())


def test_lineage_generation_and_same_mode_accepted(tmp_path):
    art = _fake_artifacts(tmp_path / "prev", counts="3\n0\n",
                          lineage_json={"generation": 4, "item_vocabulary": "catalogue"})
    prev = lineage.read_previous(art, _cfg(tmp_path, "catalogue"), TsvAdapter())
    assert prev.generation == 4 and prev.item_vocabulary == "catalogue"
    # A first-generation folder whose item table was clicked whole: both modes wrote it.
    art = _fake_artifacts(tmp_path / "both")
    for mode in ("clicked", "catalogue"):
        assert lineage.read_previous(art, _cfg(tmp_path, mode), TsvAdapter()).item_vocabulary \
            is None


def test_an_item_that_left_the_item_file_is_refused(tmp_path):
    art = _fake_artifacts(tmp_path / "prev")
    prev = lineage.read_previous(art, _cfg(tmp_path), TsvAdapter())
    out = tmp_path / "out"
    os.makedirs(out / "vocab")
    os.makedirs(out / "items")
    (out / "vocab" / "item_id.txt").write_text("m1\nm0\nn5\n")
    (out / "items" / "items.jsonl").write_text(
        '{"item": 1, "item_id": "m1"}\n{"item": 3, "item_id": "n5"}\n')
    with pytest.raises(ConfigError, match=r"1 item\(s\) .* no longer in the item file "
                                          r"\(first: \['m0'\]\)"):
        lineage.check_item_rows(str(out), prev)
    (out / "items" / "items.jsonl").write_text(
        '{"item": 1, "item_id": "m1"}\n{"item": 2, "item_id": "m0"}\n'
        '{"item": 3, "item_id": "n5"}\n')
    lineage.check_item_rows(str(out), prev)


# ---------------------------------------------------------------------------- the Beam job

def _run(root, out_root, item_vocabulary, previous=""):
    cfg = make_cfg(out_root, root, item_vocabulary=item_vocabulary, previous_artifacts=previous)
    preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(), data_dir=root,
                   verbose=False)
    return cfg.artifacts_dir


@pytest.fixture(scope="module", params=["clicked", "catalogue"])
def grown(request, tmp_path_factory):
    mode = request.param
    root1, root2 = (str(tmp_path_factory.mktemp(n)) for n in ("raw1", "raw2"))
    make_phases(root1, root2)
    art1 = _run(root1, tmp_path_factory.mktemp("out1"), mode)
    # Plain reads of the previous folder, taken before the second run.
    before = {n: read_lines(art1, n) for n in os.listdir(os.path.join(art1, "vocab"))}
    version1 = version_of(art1)
    art2 = _run(root2, tmp_path_factory.mktemp("out2"), mode, previous=art1)
    return mode, root1, root2, art1, art2, before, version1


@pytest.mark.slow
def test_first_run_is_todays_vocabulary_without_lineage(grown):
    mode, root1, _, art1, _, before, _ = grown
    counts, item_ids = ref_counts(root1)
    assert sorted(before) == sorted([f + ".txt" for f in FIELDS] + ["item_id_counts.txt"])
    for f in FIELDS:
        want = by_count(counts[f])
        if f == "item_id" and mode == "catalogue":
            want += sorted(set(item_ids) - set(counts[f]))
        assert before[f + ".txt"] == want, f
    assert before["item_id_counts.txt"] == [str(counts["item_id"][i])
                                            for i in before["item_id.txt"]]
    assert not os.path.exists(os.path.join(art1, "lineage.json"))


@pytest.mark.slow
def test_grown_vocabularies_keep_old_lines_and_append_new_ids(grown):
    mode, _, root2, art1, art2, before, version1 = grown
    counts, item_ids = ref_counts(root2)
    for f in FIELDS:
        old = before[f + ".txt"]
        new = read_lines(art2, f + ".txt")
        assert new[:len(old)] == old, f  # every old line unchanged at its position
        added = new[len(old):]
        clicked_new = set(counts[f]) - set(old)
        want = by_count(counts[f], clicked_new)
        if f == "item_id" and mode == "catalogue":
            want += sorted(set(item_ids) - set(old) - clicked_new)
        assert added == want, f
    # The ids the window brings and the ones it does not touch, spelled out.
    items = read_lines(art2, "item_id.txt")
    assert set(items) - set(before["item_id.txt"]) == (
        {f"n{k:02d}" for k in range(8 if mode == "catalogue" else 6)}
        | ({"m25", "m26", "m27", "m28", "m29"} - set(before["item_id.txt"])))
    assert {"X", "F", "M"} <= set(read_lines(art2, "user_gender.txt"))
    assert read_lines(art2, "user_id.txt")[-5:] == by_count(counts["user_id"],
                                                            [f"v{k:02d}" for k in range(5)])
    # Counts: this run's training clicks per line; old items without a click now keep 0.
    got = [int(x) for x in read_lines(art2, "item_id_counts.txt")]
    assert got == [counts["item_id"][i] for i in items]
    assert all(got[items.index(f"m{k:02d}")] == 0 for k in range(10))
    # items.jsonl on the grown indices: one row per line, tags on the grown tag vocabulary.
    tags = {t: k + 1 for k, t in enumerate(read_lines(art2, "tag.txt"))}
    raw = {r[0]: r for r in (line.rstrip("\n").split("\t")
                             for line in open(os.path.join(root2, "items.tsv"), encoding="utf-8"))}
    with open(os.path.join(art2, "items", "items.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert [(r["item"], r["item_id"]) for r in rows] == [(k + 1, i) for k, i in enumerate(items)]
    for r in rows:
        assert r["tags"] == [tags[t] for t in dict.fromkeys(raw[r["item_id"]][2].split("|"))
                             if t in tags]
    spec = json.load(open(os.path.join(art2, "examples", "feature_spec.json")))
    assert spec["vocab_sizes"]["item_id"] == len(items) + 1


@pytest.mark.slow
def test_lineage_points_at_the_previous_folder(grown):
    _, _, _, art1, art2, before, version1 = grown
    with open(os.path.join(art2, "lineage.json"), encoding="utf-8") as fh:
        rec = json.load(fh)
    assert rec["grew_from"] == version1 == lineage.vocab_version(art1)
    assert rec["version"] == version_of(art2) != version1
    assert rec["previous_artifacts"] == os.path.abspath(art1) and rec["generation"] == 1
    for f in FIELDS:
        n_old, n_new = len(before[f + ".txt"]), len(read_lines(art2, f + ".txt"))
        assert (rec["previous_sizes"][f], rec["sizes"][f], rec["appended"][f]) == (
            n_old + 1, n_new + 1, n_new - n_old), f


@pytest.mark.slow
@pytest.mark.parametrize("grown", ["clicked"], indirect=True)
def test_growing_in_place_from_the_same_clicks_changes_no_vocabulary_byte(grown, tmp_path):
    mode, root1, _, art1, _, before, version1 = grown
    # A copy of the first folder is grown in place (previous_artifacts = the output folder).
    shutil.copytree(art1, tmp_path / "t")
    art = _run(root1, tmp_path, mode, previous=str(tmp_path / "t"))
    assert art == str(tmp_path / "t") and version_of(art) == version1
    with open(os.path.join(art, "lineage.json"), encoding="utf-8") as fh:
        rec = json.load(fh)
    assert set(rec["appended"].values()) == {0} and rec["grew_from"] == version1
    assert rec["previous_artifacts"] == art


def test_the_command_line_refuses_in_one_line_and_keeps_the_output_folder(tmp_path, capsys):
    from micrec_tf import cli

    os.makedirs(tmp_path / "raw")
    write_raw(str(tmp_path / "raw"), _old_items(), [("u00", "M", "18")],
              [("u00", "m00", T0), ("u00", "m01", T0 + 1)])
    out = tmp_path / "art" / "t"
    os.makedirs(out)
    (out / "stats.json").write_text('{"old": 1}')  # an earlier artifacts folder, kept as is
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"name": "t", "artifacts_root": str(tmp_path / "art"), "data": {
        "dataset": "canonical", "data_dir": str(tmp_path / "raw")}}))
    prev = _fake_artifacts(tmp_path / "prev", stats={"dataset": "synthetic"})
    for argv, needle in (
            (["--previous_artifacts", str(tmp_path / "nowhere")], "no such folder"),
            (["--set", f"preprocess.previous_artifacts={prev}"],
             "built with dataset 'synthetic', this run's is 'canonical'")):
        assert cli.run(preprocess.main, ["--config", str(cfg), *argv]) == 2
        _, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
        assert sorted(os.listdir(out)) == ["stats.json"]
        assert (out / "stats.json").read_text() == '{"old": 1}'

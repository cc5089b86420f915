"""Dataset adapters on fixture files written by the tests, plus the real data when it is there."""
import collections
import gzip
import json
import os
import pickle

import pytest

from micrec_tf.config import DataConfig, SyntheticConfig
from micrec_tf.data import adapters as ad
from micrec_tf.data import synthetic
from micrec_tf.data.schema import (BAD_JSON, BAD_TIMESTAMP, EMPTY_ID, WRONG_FIELD_COUNT,
                                   Interaction, Item, RowError, User)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "datasets"))


def _write(path, lines, encoding="utf-8", compress=False):
    data = "".join(line + "\n" for line in lines).encode(encoding)
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def _parse_all(adapter, files, parse, data_dir):
    """All rows of a table and the reasons of the bad lines, in file order."""
    rows, errors = [], []
    for line in adapter.read_lines(files, data_dir):
        try:
            rows.extend(parse(line))
        except RowError as err:
            errors.append(err.reason)
    return rows, errors


def _reason(parse, line):
    with pytest.raises(RowError) as info:
        parse(line)
    return info.value.reason


def _check_picklable(adapter):
    clone = pickle.loads(pickle.dumps(adapter))
    assert type(clone) is type(adapter)
    assert clone.user_fields == adapter.user_fields
    assert clone.item_extra_fields == adapter.item_extra_fields
    for name in ("parse_interaction", "parse_item", "parse_user"):
        pickle.loads(pickle.dumps(getattr(adapter, name)))


# --------------------------------------------------------------------------------------------
def test_canonical(tmp_path):
    _write(tmp_path / "interactions.tsv.gz", [
        "user_id\titem_id\ttimestamp", "u1\ti1\t100", "u1\ti2\t160", "", "u2\ti1\t5",
        "u2\ti1", "u2\ti1\tyesterday", "u2\ti1\t-4", "\ti1\t7", "u3\t \t7"], compress=True)
    _write(tmp_path / "items.tsv", [
        "item_id\ttitle\ttags\tprovider\tformat\tlang",
        "i1\tCafé Crème\tfood|drink\tp1\tvideo\tfr", "i2\tNo tags\t\t\tarticle\ten",
        "i3\ttoo few\tx\tp\tvideo"])
    _write(tmp_path / "users.tsv", ["user_id\tgender\tage", "u1\tF\t18-24", "u2\tM\t"])
    adapter = ad.CanonicalAdapter.from_dir(str(tmp_path))
    assert adapter.user_fields == ("gender", "age")
    assert adapter.item_extra_fields == ("format", "lang")
    _check_picklable(adapter)

    rows, errors = _parse_all(adapter, adapter.interaction_files, adapter.parse_interaction,
                              str(tmp_path))
    assert rows == [Interaction("u1", "i1", 100), Interaction("u1", "i2", 160),
                    Interaction("u2", "i1", 5)]
    assert errors == [WRONG_FIELD_COUNT, BAD_TIMESTAMP, BAD_TIMESTAMP, EMPTY_ID, EMPTY_ID]

    items, errors = _parse_all(adapter, adapter.item_files, adapter.parse_item, str(tmp_path))
    assert items == [Item("i1", "Café Crème", ("food", "drink"), "p1",
                          {"format": "video", "lang": "fr"}),
                     Item("i2", "No tags", (), "", {"format": "article", "lang": "en"})]
    assert errors == [WRONG_FIELD_COUNT]

    users, errors = _parse_all(adapter, adapter.user_files, adapter.parse_user, str(tmp_path))
    assert [(u.user_id, u.profile) for u in users] == [
        ("u1", {"gender": "F", "age": "18-24"}), ("u2", {"gender": "M", "age": ""})]
    assert errors == []
    assert _reason(adapter.parse_user, "u1\tF") == WRONG_FIELD_COUNT
    assert adapter.parse_interaction("u1\ti1\t100\r\n") == [Interaction("u1", "i1", 100)]


def test_canonical_without_users_and_bad_header(tmp_path):
    _write(tmp_path / "items.tsv", ["item_id\ttitle\ttags\tprovider", "i1\tt\t\t"])
    adapter = ad.CanonicalAdapter.from_dir(str(tmp_path))
    assert adapter.user_fields == () and adapter.item_extra_fields == ()
    _write(tmp_path / "items.tsv", ["id\ttitle\ttags\tprovider"])
    with pytest.raises(ValueError, match="header"):
        ad.CanonicalAdapter.from_dir(str(tmp_path))


def test_synthetic_through_get_adapter(tmp_path):
    out = str(tmp_path / "syn")
    cfg = DataConfig(dataset="synthetic", data_dir=out)
    with pytest.raises(FileNotFoundError, match="not been generated") as info:
        ad.get_adapter(cfg)
    assert out in str(info.value)
    syn = SyntheticConfig(num_users=30, num_items=40, num_events=400, num_topics=4, seed=2)
    synthetic.generate(syn, out)
    adapter = ad.get_adapter(cfg)
    assert isinstance(adapter, ad.CanonicalAdapter) and adapter.name == "synthetic"
    assert adapter.user_fields == synthetic.USER_FIELDS
    assert adapter.item_extra_fields == synthetic.ITEM_EXTRA_FIELDS
    for files, parse, n in ((adapter.interaction_files, adapter.parse_interaction, 400),
                            (adapter.item_files, adapter.parse_item, 40),
                            (adapter.user_files, adapter.parse_user, 30)):
        rows, errors = _parse_all(adapter, files, parse, out)
        assert len(rows) == n and errors == []
    items, _ = _parse_all(adapter, adapter.item_files, adapter.parse_item, out)
    assert all(1 <= len(i.tags) <= 4 and i.provider and i.extra["format"] for i in items)


def test_get_adapter_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        ad.get_adapter(DataConfig(dataset="nope", data_dir=str(tmp_path)))
    missing = str(tmp_path / "no_such_dir")
    for dataset in ("movielens_1m", "movielens_100k", "mind", "amazon", "canonical"):
        with pytest.raises(FileNotFoundError) as info:
            ad.get_adapter(DataConfig(dataset=dataset, data_dir=missing))
        assert missing in str(info.value)
    # the dir exists but holds none of the dataset's files
    with pytest.raises(FileNotFoundError, match="ratings") as info:
        ad.get_adapter(DataConfig(dataset="movielens_1m", data_dir=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------------------------
def _ml1m_fixture(d):
    _write(d / "ratings_users_1-2.dat.gz", [
        "1::1193::5::978300760", "1::2::3::978302109", "2::1193::4::978298413",
        "", "1::2::3", "1::2::3::soon", "::2::3::978302109", "2::::3::978302109",
        "1::2::3::4::5"], encoding="latin-1", compress=True)
    _write(d / "movies.dat", [
        "2::Jumanji (1995)::Adventure|Children's|Fantasy",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "73::Misérables, Les (1995)::Drama|Musical",
        "1361::Café au Lait (1993)::Comedy",
        "5::No Year Movie::", "6::Broken"], encoding="latin-1")
    _write(d / "users.dat", ["1::F::1::10::48067", "2::M::56::16::70072-1234", "3::M::25"],
           encoding="latin-1")


def test_movielens_1m(tmp_path):
    _ml1m_fixture(tmp_path)
    adapter = ad.get_adapter(DataConfig(dataset="movielens_1m", data_dir=str(tmp_path)))
    assert isinstance(adapter, ad.MovieLens1MAdapter)
    _check_picklable(adapter)
    d = str(tmp_path)
    rows, errors = _parse_all(adapter, adapter.interaction_files, adapter.parse_interaction, d)
    assert rows == [Interaction("1", "1193", 978300760), Interaction("1", "2", 978302109),
                    Interaction("2", "1193", 978298413)]
    assert errors == [WRONG_FIELD_COUNT, BAD_TIMESTAMP, EMPTY_ID, EMPTY_ID, WRONG_FIELD_COUNT]

    items, errors = _parse_all(adapter, adapter.item_files, adapter.parse_item, d)
    by_id = {i.item_id: i for i in items}
    assert by_id["2"].tags == ("Adventure", "Children's", "Fantasy")
    assert by_id["2"].provider == "" and by_id["2"].extra == {"year": "1995"}
    assert by_id["73"].title == "Misérables, Les (1995)"  # latin-1 decoded
    assert by_id["1361"].title == "Café au Lait (1993)"
    assert by_id["5"].tags == () and by_id["5"].extra == {"year": ""}
    assert errors == [WRONG_FIELD_COUNT]

    users, errors = _parse_all(adapter, adapter.user_files, adapter.parse_user, d)
    assert [u.user_id for u in users] == ["1", "2"]
    assert users[0] == User("1", {"gender": "F", "age": "1", "occupation": "10",
                                  "zip_prefix": "48"})
    assert users[1].profile["zip_prefix"] == "70"
    assert adapter.user_fields == ("gender", "age", "occupation", "zip_prefix")
    assert errors == [WRONG_FIELD_COUNT]


def test_movielens_100k(tmp_path):
    flags = ["0"] * 19
    action_comedy = list(flags)
    action_comedy[1] = action_comedy[5] = "1"
    _write(tmp_path / "u.data", ["196\t242\t3\t881250949", "186\t302\t3\t891717742",
                                 "186\t302\t3", "22\t377\t1\t8.5e8", "\t1\t1\t1"])
    _write(tmp_path / "u.item", [
        "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", "http://x"] + action_comedy),
        "|".join(["2", "Misérables, Les (1995)", "01-Jan-1995", "", "http://y"] + flags),
        "|".join(["267", "unknown", "", "", ""] + ["1"] + flags[1:]),
        "|".join(["9", "No year", "12-Mar-1996", "", ""] + flags),
        "|".join(["3", "Short row", "", ""] + flags)], encoding="latin-1")
    _write(tmp_path / "u.user", ["1|24|M|technician|85711", "2|53|F|other|94043",
                                 "3|17|M|student|T8H1N", "4|56|F|writer|10003", "5|30|M"])
    adapter = ad.get_adapter(DataConfig(dataset="movielens_100k", data_dir=str(tmp_path)))
    _check_picklable(adapter)
    d = str(tmp_path)
    rows, errors = _parse_all(adapter, adapter.interaction_files, adapter.parse_interaction, d)
    assert rows == [Interaction("196", "242", 881250949), Interaction("186", "302", 891717742)]
    assert errors == [WRONG_FIELD_COUNT, BAD_TIMESTAMP, EMPTY_ID]

    items, errors = _parse_all(adapter, adapter.item_files, adapter.parse_item, d)
    by_id = {i.item_id: i for i in items}
    assert by_id["1"].tags == ("Action", "Comedy") and by_id["1"].extra == {"year": "1995"}
    assert by_id["2"].title == "Misérables, Les (1995)" and by_id["2"].tags == ()
    assert by_id["267"].tags == ("unknown",) and by_id["267"].extra == {"year": ""}
    assert by_id["9"].extra == {"year": "1996"}  # from the release date
    assert errors == [WRONG_FIELD_COUNT]

    users, errors = _parse_all(adapter, adapter.user_files, adapter.parse_user, d)
    profiles = {u.user_id: u.profile for u in users}
    assert profiles["1"] == {"gender": "M", "age": "18", "occupation": "technician",
                             "zip_prefix": "85"}
    assert [profiles[u]["age"] for u in "1234"] == ["18", "50", "1", "56"]  # ML-1M buckets
    assert profiles["3"]["zip_prefix"] == "T8"
    assert errors == [WRONG_FIELD_COUNT]


def test_mind(tmp_path):
    entities = json.dumps([{"Label": "Fort Lauderdale", "Type": "G", "Confidence": 1.0}])
    _write(tmp_path / "news.tsv", [
        "\t".join(["N1", "news", "newspolitics", "Title one | PHOTOS", "Abstract.",
                   "https://x/1.html", entities, "[]"]),
        "\t".join(["N2", "sports", "football_nfl", "Title two", "", "https://x/2.html", "[]",
                   "[]"]),
        "\t".join(["", "sports", "golf", "No id", "", "", "[]", "[]"]),
        "\t".join(["N3", "sports", "golf", "Seven fields", "", "", "[]"])])
    _write(tmp_path / "behaviors.tsv.gz", [
        "1\tU1\t11/12/2019 2:14:46 PM\tN7 N8 N9\tN1-1 N2-0 N3-1",
        "2\tU1\t11/13/2019 8:00:00 AM\tN7 N8 N9\tN2-1",
        "3\tU2\t11/14/2019 11:59:59 PM\t\tN1-0 N2-0",
        "4\tU3\t11/11/2019 9:00:00 AM\t\tN5 N6",  # unlabelled impressions: no clicks
        "5\tU2\t2019-11-14 10:00:00\tN1\tN2-1",
        "6\tU2\t11/14/2019 10:00:00 AM\tN1",
        "7\t\t11/14/2019 10:00:00 AM\tN1\tN2-1",
        "8\tU2\t11/14/2019 10:00:00 AM\tN1\tN2-x"], compress=True)
    adapter = ad.get_adapter(DataConfig(dataset="mind", data_dir=str(tmp_path)))
    assert isinstance(adapter, ad.MindAdapter)
    _check_picklable(adapter)
    d = str(tmp_path)
    items, errors = _parse_all(adapter, adapter.item_files, adapter.parse_item, d)
    assert items == [Item("N1", "Title one | PHOTOS", ("news", "newspolitics"), ""),
                     Item("N2", "Title two", ("sports", "football_nfl"), "")]
    assert errors == [EMPTY_ID, WRONG_FIELD_COUNT]

    rows, errors = _parse_all(adapter, adapter.interaction_files, adapter.parse_interaction, d)
    assert errors == [BAD_TIMESTAMP, WRONG_FIELD_COUNT, EMPTY_ID, WRONG_FIELD_COUNT]
    t1 = 1573568086  # 2019-11-12 14:14:46 UTC
    anchor = ad.MIND_HISTORY_ANCHOR
    step = adapter.history_step_s
    first = adapter.parse_interaction("1\tU1\t11/12/2019 2:14:46 PM\tN7 N8 N9\tN1-1 N2-0 N3-1")
    assert first == [Interaction("U1", "N7", anchor - 3 * step),
                     Interaction("U1", "N8", anchor - 2 * step),
                     Interaction("U1", "N9", anchor - step),
                     Interaction("U1", "N1", t1), Interaction("U1", "N3", t1)]
    # the same history on another impression line gives exactly the same rows
    assert rows[:5] == first and rows[5:8] == first[:3]
    assert rows[8] == Interaction("U1", "N2", 1573632000)  # 11/13/2019 8:00:00 AM UTC
    assert len(rows) == 9
    # an impression before the anchor still comes after its history
    early = adapter.parse_interaction("9\tU4\t11/01/2019 12:00:00 AM\tN1\tN2-1")
    assert early[0].timestamp < early[1].timestamp == 1572566400
    assert adapter.parse_user("anything") == [] and adapter.user_fields == ()


def test_amazon(tmp_path):
    reviews = [
        {"overall": 5.0, "verified": True, "reviewTime": "02 26, 2014",
         "reviewerID": "A1", "asin": "B001", "reviewerName": "Zoë", "unixReviewTime": 1393372800},
        {"overall": 4.0, "reviewerID": "A1", "asin": "B002", "unixReviewTime": 1393459200,
         "style": {"Format:": " Print Magazine"}},
        {"overall": 3.0, "reviewerID": "A2", "asin": "B001", "unixReviewTime": 1393459200.0},
    ]
    bad_reviews = [
        '{"reviewerID": "A3", "asin": "B001", "unixReviewTime": 13933',  # truncated json
        '["A3", "B001"]',
        json.dumps({"reviewerID": "A3", "unixReviewTime": 1393372800}),
        json.dumps({"reviewerID": "", "asin": "B001", "unixReviewTime": 1393372800}),
        json.dumps({"reviewerID": "A3", "asin": "B001"}),
        json.dumps({"reviewerID": "A3", "asin": "B001", "unixReviewTime": "Feb 2014"}),
    ]
    _write(tmp_path / "Magazine_Subscriptions_5.json.gz",
           [json.dumps(r) for r in reviews] + [""] + bad_reviews, compress=True)
    broken = '<span class="a-size-medium a-color-secondary"'
    meta = [
        {"asin": "B001", "title": broken, "brand": "Consumer  Reports",
         "category": ["Magazine Subscriptions", "Home &amp; Garden", "Consumer Guides"],
         "description": ["Consumer Reports tests products. It has no ads."],
         "details": {"Format:": "Print Magazine", "Publisher:": "CR"}},
        {"asin": "B002", "title": "PC World", "category": ["Magazine Subscriptions"],
         "description": [], "details": {"Publisher:": "IDG"}},
        {"asin": "B003", "title": ' Magazines" />', "brand": "Meredith", "description": []},
        {"asin": "B004", "title": "<b>Woman&#39;s Day</b>", "brand": "Hearst",
         "category": ["Magazine Subscriptions", "Women's Interest", "Women's Interest"]},
    ]
    _write(tmp_path / "meta_Magazine_Subscriptions.json.gz",
           [json.dumps(m, ensure_ascii=False) for m in meta]
           + [json.dumps(meta[0]), "not json", json.dumps({"title": "no asin"})], compress=True)
    adapter = ad.get_adapter(DataConfig(dataset="amazon", data_dir=str(tmp_path)))
    assert isinstance(adapter, ad.AmazonAdapter)
    _check_picklable(adapter)
    d = str(tmp_path)
    rows, errors = _parse_all(adapter, adapter.interaction_files, adapter.parse_interaction, d)
    assert rows == [Interaction("A1", "B001", 1393372800), Interaction("A1", "B002", 1393459200),
                    Interaction("A2", "B001", 1393459200)]
    assert errors == [BAD_JSON, BAD_JSON, EMPTY_ID, EMPTY_ID, BAD_TIMESTAMP, BAD_TIMESTAMP]

    items, errors = _parse_all(adapter, adapter.item_files, adapter.parse_item, d)
    assert errors == [BAD_JSON, EMPTY_ID]
    assert len(items) == 5 and items[4] == items[0]  # duplicates are left to the pipeline
    b1, b2, b3, b4 = items[:4]
    assert b1.title == "Consumer Reports tests products."  # broken title -> description
    assert b1.tags == ("Home & Garden", "Consumer Guides")
    assert b1.provider == "Consumer Reports" and b1.extra == {"format": "Print Magazine"}
    assert b2.title == "PC World" and b2.tags == () and b2.provider == "IDG"
    assert b2.extra == {"format": ""}
    assert b3.title == "Meredith"  # no usable title nor description: the brand
    assert b4.title == "Woman's Day" and b4.tags == ("Women's Interest",)
    assert adapter.user_files.patterns == () and adapter.parse_user("x") == []


# --------------------------------------------------------------------------------------------
REAL = {
    # dataset: (folder, interactions, distinct users, distinct items clicked, item rows,
    #           distinct items, user rows)
    "movielens_1m": ("ml-1m-partial", 487650, 2999, 3615, 3883, 3883, 6040),
    "movielens_100k": ("ml-100k", 100000, 943, 1682, 1682, 1682, 943),
    "amazon": ("amazon-magazine-2018", 2375, 348, 157, 3385, 2320, 0),
}


def _real_counts(dataset, data_dir):
    adapter = ad.get_adapter(DataConfig(dataset=dataset, data_dir=data_dir))
    inter, e1 = _parse_all(adapter, adapter.interaction_files, adapter.parse_interaction,
                           data_dir)
    items, e2 = _parse_all(adapter, adapter.item_files, adapter.parse_item, data_dir)
    users, e3 = ([], []) if not adapter.user_files.patterns else _parse_all(
        adapter, adapter.user_files, adapter.parse_user, data_dir)
    assert e1 == e2 == e3 == []
    return adapter, inter, items, users


@pytest.mark.parametrize("dataset", sorted(REAL))
@pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} not present")
def test_real_data(dataset):
    folder, n_inter, n_users, n_clicked, n_item_rows, n_items, n_user_rows = REAL[dataset]
    data_dir = os.path.join(SHARED, folder)
    if not os.path.isdir(data_dir):
        pytest.skip(f"{data_dir} not present")
    adapter, inter, items, users = _real_counts(dataset, data_dir)
    assert len(inter) == n_inter
    assert len({r.user_id for r in inter}) == n_users
    assert len({r.item_id for r in inter}) == n_clicked
    assert len(items) == n_item_rows and len({i.item_id for i in items}) == n_items
    assert len(users) == n_user_rows
    if dataset.startswith("movielens"):
        titles = {i.title for i in items}
        assert "Misérables, Les (1995)" in titles
        assert all(i.extra["year"] for i in items if i.title != "unknown")
        assert {r.item_id for r in inter} <= {i.item_id for i in items}
        genres = {t for i in items for t in i.tags}
        assert len(genres) == (18 if dataset == "movielens_1m" else 19)
    if dataset == "amazon":
        clicked = {r.item_id for r in inter}
        meta = {i.item_id: i for i in items if i.item_id in clicked}
        assert len(meta) == 151
        assert all(i.title and "<" not in i.title for i in meta.values())
        assert sum(1 for i in meta.values() if i.provider) >= 148


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "mind-small-sample")),
                    reason="mind-small-sample not present")
def test_real_data_mind():
    data_dir = os.path.join(SHARED, "mind-small-sample")
    adapter, inter, items, _ = _real_counts("mind", data_dir)
    assert len(items) == 2000
    assert len({i.tags[0] for i in items}) == 15 and len({i.tags[1] for i in items}) == 143
    impression_clicks = [r for r in inter if r.timestamp >= ad.MIND_HISTORY_ANCHOR]
    assert len(impression_clicks) == 7542
    assert len({r.user_id for r in inter}) == 4637
    lo, hi = min(r.timestamp for r in impression_clicks), max(r.timestamp for r in inter)
    assert lo >= 1573257673 and hi <= 1573775413  # 2019-11-09 00:01:13 .. 11-14 23:50:13 UTC
    per_line = collections.Counter(r.timestamp < ad.MIND_HISTORY_ANCHOR for r in inter)
    assert per_line[True] > per_line[False]  # most clicks come from the histories


def test_no_tensorflow_or_beam_import():
    import subprocess
    import sys

    code = ("import sys, micrec_tf.data.adapters, micrec_tf.data.synthetic\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'apache_beam', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"

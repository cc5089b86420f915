"""Benchmark section 3: titles/s of the title encoder (all-MiniLM-L6-v2) on the artifacts'
titles."""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np

from benchmarks.harness import ROOT, median, rounded


def bench_title_encoding(cfg, p, state) -> dict:
    from micrec_tf.data.artifacts import ITEMS
    from micrec_tf.text.encoder import TitleEncoder

    titles, source = [], None
    art_dir = None
    art = state.get("art")
    if art is not None:
        art_dir = art.path
    else:
        cand = cfg.artifacts_dir if os.path.isabs(cfg.artifacts_dir) else os.path.join(
            ROOT, cfg.artifacts_dir)
        art_dir = cand if os.path.exists(os.path.join(cand, ITEMS)) else None
    if art_dir:
        with open(os.path.join(art_dir, ITEMS), encoding="utf-8") as fh:
            titles = [t for t in (json.loads(line).get("title") for line in fh if line.strip())
                      if t and t.strip()]
        shown = os.path.relpath(art_dir, ROOT) if art_dir.startswith(ROOT) else art_dir
        source = f"titles of {shown}"
    if not titles:
        from micrec_tf.data.synthetic import GENERIC_WORDS, THEMES
        rng = np.random.default_rng(0)
        words = [w for _, ws in THEMES for w in ws.split()] + list(GENERIC_WORDS)
        titles = [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(2000)]
        source = "synthetic titles (3-8 topic words)"
    pattern = getattr(cfg.semantic, "title_strip_pattern", "") or ""
    if pattern:
        titles = [re.sub(pattern, "", t) for t in titles]
    count = min(int(p["title_count"]), len(titles))
    titles = titles[:count]
    t0 = time.perf_counter()
    enc = TitleEncoder(max_length=cfg.semantic.max_length)
    load_s = time.perf_counter() - t0
    bs = int(cfg.semantic.batch_size)
    t0 = time.perf_counter()
    enc.encode(titles, batch_size=bs)  # warm-up: traces every length bucket
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(p["title_repeats"]):
        t0 = time.perf_counter()
        enc.encode(titles, batch_size=bs)
        times.append(time.perf_counter() - t0)
    tokens = [len(r) for r in enc.token_ids(titles)]
    t = median(times)
    return {"titles": count, "source": source, "batch_size": bs,
            "max_length": int(cfg.semantic.max_length),
            "mean_tokens": rounded(float(np.mean(tokens))), "load_s": rounded(load_s),
            "warmup_s": rounded(warm_s), "seconds_all": [rounded(x) for x in times],
            "titles_per_s": rounded(count / t),
            "headline": {"titles_per_s": rounded(count / t)}}

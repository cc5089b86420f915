"""Where the preprocessing job's memory goes: Beam's per-PCollection element counts and sizes.

    python -m benchmarks.preprocess_memory --config configs/synthetic-1m.yaml \
        --set data.synthetic.num_items=100000 ... [--top 25] [--out docs/results/preprocess-memory.json]

Runs :func:`pipelines.preprocess.build_pipeline` on the DirectRunner in this process and reads
the runner's monitoring infos: ``beam:metric:element_count:v1`` and
``beam:metric:sampled_byte_size:v1`` per PCollection (the encoded size of a sample of its
elements, as the runner stores them between fused stages). The table's estimated total is count
x sampled mean; the sample is biased when element sizes vary a lot (a one-element PCollection is
exact). It also prints the process's peak RSS (the DirectRunner holds every materialised
PCollection in this one process).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time


def pcollection_sizes(result, names: dict) -> list:
    """``[{pcollection, name, elements, mean_bytes, est_bytes}]`` largest first."""
    from apache_beam.metrics import monitoring_infos as mi

    rows = {}
    for info in result.monitoring_infos():
        if info.urn not in (mi.SAMPLED_BYTE_SIZE_URN, mi.ELEMENT_COUNT_URN):
            continue
        pc = info.labels.get(mi.PCOLLECTION_LABEL)
        value = mi.extract_metric_result_map_value(info)
        d = rows.setdefault(pc, {"pcollection": pc, "name": names.get(pc, pc), "elements": 0,
                                 "mean_bytes": 0.0})
        if info.urn == mi.ELEMENT_COUNT_URN:
            d["elements"] = max(d["elements"], int(value or 0))
        elif value is not None and value.mean is not None:
            d["mean_bytes"] = max(d["mean_bytes"], float(value.mean))
    for d in rows.values():
        d["est_bytes"] = int(d["elements"] * d["mean_bytes"])
    return sorted(rows.values(), key=lambda d: -d["est_bytes"])


def main(argv=None) -> int:
    from micrec_tf import cli
    from micrec_tf.config import load_config, parse_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cli.quiet_logs()
    cfg = load_config(args.config, parse_overrides(args.set))

    import apache_beam as beam

    from pipelines import preprocess
    from pipelines.options import pipeline_options

    adapter, data_dir = preprocess._resolve_data(cfg, None, None)
    out_dir = tempfile.mkdtemp(prefix="micrec-pcmem-")
    try:
        p = beam.Pipeline(options=pipeline_options(cfg, []))
        preprocess.build_pipeline(p, cfg, adapter, data_dir, out_dir)
        names = {k: v.unique_name for k, v in p.to_runner_api().components.pcollections.items()}
        start = time.time()
        result = p.run()
        result.wait_until_finish()
        wall = time.time() - start
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    rows = pcollection_sizes(result, names)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"preprocess {cfg.name}: wall {wall:.1f} s, peak RSS {peak:,.0f} MiB")
    print(f"{'est. MiB':>10} {'elements':>10} {'mean B':>10}  PCollection")
    for d in rows[:args.top]:
        print(f"{d['est_bytes'] / 2**20:10.1f} {d['elements']:>10,} {d['mean_bytes']:10.0f}  "
              f"{d['name']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"config": args.config, "overrides": args.set, "wall_s": round(wall, 1),
                       "peak_rss_mib": round(peak, 1), "pcollections": rows[:args.top]}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks --config configs/ml-1m.yaml``: the benchmark suite (``make bench``)."""
import sys

from micrec_tf import cli

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(cli.run(main))

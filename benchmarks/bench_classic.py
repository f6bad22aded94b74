"""The classic-mixture comparison (``moekit classic``) as a benchmark script.

python benchmarks/bench_classic.py                        # every data set, 5 seeds
python benchmarks/bench_classic.py --datasets arm --seeds 3
"""

import sys

from moekit.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["classic", *sys.argv[1:]]))

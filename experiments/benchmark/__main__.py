"""`python -m experiments.benchmark`: parse the flags, run the benchmark and exit with `main`'s status
(0, or 2 after a one-line error).
"""

import sys

from experiments.benchmark.cli import main

sys.exit(main())

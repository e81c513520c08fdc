"""``python -m benchmarks.engine --device cuda --size full --dtype bf16``."""

import sys

from benchmarks.engine import cli

sys.exit(cli())

"""nanochat: train, evaluate and talk to your own small ChatGPT."""
import os

# OpenMP threads that busy-wait between parallel regions halve CPU throughput when anything else
# shares the cores, e.g. the loader's tokenizer threads (docs/benchmarks.md). Must be set before
# torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

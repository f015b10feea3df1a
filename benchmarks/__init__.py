"""Benchmarks that print the figures docs/performance.md quotes. Run each from the repository root as a module, `python -m benchmarks.NAME --help`,
so that the repository's modules import without any path set up.

Importing this package sets the offline defaults before torch, transformers or datasets load (they read
them once, at import): nothing here needs the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""Benchmark suite: stock vs patched ``from_pretrained``, each trial in a fresh process.

* :mod:`fasthug_patch.bench.checkpoints` -- seeded random Llama-family checkpoints, cached.
* :mod:`fasthug_patch.bench.trial` -- one load in one fresh process, one JSON line out.
* :mod:`fasthug_patch.bench.runner` -- ABBA-alternated rounds, statistics, tables.
* :mod:`fasthug_patch.bench.ceiling` -- memory / page-cache / disk bandwidth ceilings.

Nothing heavy (torch, transformers) is imported by this package itself; the modules
import them inside the functions that need them.
"""

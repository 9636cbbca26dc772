"""overheard: shared model code (torch/numpy/fsspec only; never imports Ray).

Kept apart from ``actors/`` and ``jobs/`` so that training scripts, actors, benchmarks and
notebooks load exactly the same model code, and so the GPU-side code can be tested and
benchmarked without a Ray cluster (see README, "Layout").
"""

__version__ = "0.1.0"

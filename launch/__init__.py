"""Entry points: training (``launch.main``) and benchmarks (``launch.bench``)."""

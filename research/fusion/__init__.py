"""Optimal-transport alignment and fusion of whole transformers (Imfeld et al., 2024,
"Transformer Fusion with Optimal Transport"), with git-re-basin's permutation baselines.

* :mod:`~research.fusion.spec`: the transport-map flow of each architecture;
* :mod:`~research.fusion.solvers`: exact assignment and Sinkhorn, batched;
* :mod:`~research.fusion.activations`: activation statistics for activation costs;
* :mod:`~research.fusion.align`: alignment, rewriting and fusion over a spec;
* :mod:`~research.fusion.matching`: weight matching and activation matching.
"""

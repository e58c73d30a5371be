"""Helpers for tests, tools and model cards, not used by training: tiny model builders (``builders``), the real
SmolLM2-135M model built from a PyPI wheel (``real_model``), TensorBoard scalars read back and ``python -m rlad_pl fit``
run as a subprocess (``runs``)."""

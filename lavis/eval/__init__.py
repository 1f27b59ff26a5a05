"""Benchmarks: ``python -m lavis.eval`` (see ``lavis/eval/__main__.py``) and the pieces it is made of."""

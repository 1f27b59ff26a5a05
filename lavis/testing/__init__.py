"""Writers of synthetic files with the real layouts (weight files with the real key names and shapes), for tests, the
GPU check and trying the tools without downloads (``python -m lavis.testing.synthetic``)."""

"""Writers of synthetic files with the real layouts (weight files with the real key names and shapes), for tests and
for trying the tools without downloads (``python -m lavis.testing.synthetic``). Nothing in the library imports them."""

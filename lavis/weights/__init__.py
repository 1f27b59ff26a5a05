"""Loading real weights into our modules: every tensor of every file is accounted for (see ``report.py``)."""

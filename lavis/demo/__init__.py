"""The embedded default: ``make demo``'s runner (``run``;
``python -m lavis.demo``). Its data generator is ``lavis.data.shapes``."""

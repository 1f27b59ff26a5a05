"""The embedded default: the shapes data generator (``shapes``) and ``make demo``'s runner (``run``;
``python -m lavis.demo``)."""

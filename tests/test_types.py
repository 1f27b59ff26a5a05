"""Facts the type checker (pyright, `make lint`) relies on, and the bugs it found."""

from __future__ import annotations

from typing import get_args

from lavis.data.formats import FORMATS, DatasetFormat
from lavis.data.templates import TEMPLATES, TemplateName


def test_template_names_are_the_template_table() -> None:
    assert get_args(TemplateName) == tuple(TEMPLATES)


def test_dataset_formats_are_the_format_table() -> None:
    assert get_args(DatasetFormat) == tuple(FORMATS)

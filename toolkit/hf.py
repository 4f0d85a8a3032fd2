"""Quieter Hugging Face libraries where the toolkit prints its own, clearer line instead."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_datasets():
    """No `datasets` progress bars while a task's small tables are read and mapped."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def quiet_transformers():
    """The loader's report of freshly initialised head weights is expected where a head is added; the
    toolkit prints its own line about new weights."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)

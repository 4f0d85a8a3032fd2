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
    toolkit prints its own line about new weights; no "Loading weights" progress bar either."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()

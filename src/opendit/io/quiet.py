"""transformers' loading and import messages off while OpenDiT loads a pipeline's components (its verbosity is
process-wide: restored afterwards)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_transformers():
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)

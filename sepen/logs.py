"""Logging to stderr (and the rule's log file when Snakemake redirects stderr there)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("SEPEN_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )

    def log_uncaught(kind, value, tb):
        logging.getLogger("sepen").critical("uncaught exception", exc_info=(kind, value, tb))

    sys.excepthook = log_uncaught

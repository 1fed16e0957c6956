"""Logging as every entry point sets it up (the CLI, ``python -m`` tools)."""
from __future__ import annotations

import logging


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "bokeh", "tornado", "PIL", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bokeh warns that the dashboard accepts any websocket origin; the embedded one listens on 127.0.0.1
    logging.getLogger("bokeh.server.util").setLevel(logging.ERROR)

"""Logging for every Kaizen process, set up one way: `kaizen serve`, `kaizen train`, a training
round's child process, `kaizen reward ...`.

    from kaizen.core.log_setup import setup_logging
    setup_logging(settings)     # KAIZEN_LOG_LEVEL, one line per record on stderr
"""

from __future__ import annotations

import logging
import sys

from kaizen.core.settings import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: Settings) -> None:
    """Records at `log_level` and above to stderr (the supervisor and containers collect it)."""
    logging.basicConfig(level=settings.log_level.upper(), format=FORMAT, stream=sys.stderr)
    # kafka-python logs every group (re)join at INFO; keep its warnings only.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))

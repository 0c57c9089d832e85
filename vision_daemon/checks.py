"""What every settings module shares: the one-line ConfigError, the name rule, and the range check.

Below both config.py and the analytics settings in the layer contract, so that the Config can
hold the analytics tables and both raise the same error.
"""

from __future__ import annotations

import math
import re


class ConfigError(Exception):
    """A bad configuration value; the message is one line that says what to fix."""


# A stream's name, and so a camera's, a zone's and a line's (they end up in MQTT topics and
# metric labels).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")


def between(value: float, low: float, high: float) -> bool:
    """low <= value <= high, and a finite number (NaN and infinity are refused)."""
    return math.isfinite(value) and low <= value <= high

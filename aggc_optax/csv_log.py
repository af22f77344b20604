"""Moved to :mod:`aggc_optax.monitoring.csv_log`; this import path keeps working."""

import sys

from aggc_optax.monitoring import csv_log as _moved

sys.modules[__name__] = _moved

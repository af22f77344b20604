"""Moved to :mod:`aggc_optax.monitoring.plotting`; this import path keeps working."""

import sys

from aggc_optax.monitoring import plotting as _moved

sys.modules[__name__] = _moved

"""Moved to :mod:`aggc_optax.torch.reference`; this import path keeps working."""

import sys

from aggc_optax.torch import reference as _moved

sys.modules[__name__] = _moved

"""Moved to :mod:`aggc_optax.torch.parity`; this path keeps working, as a module and as
``python -m aggc_optax.parity`` (which, without PyTorch, says what to install)."""

import sys

if __name__ == "__main__":
    try:
        from aggc_optax.torch.parity import main
    except ImportError as err:
        sys.exit(f"python -m aggc_optax.parity: {err}")
    sys.exit(main())
else:
    from aggc_optax.torch import parity as _moved

    sys.modules[__name__] = _moved

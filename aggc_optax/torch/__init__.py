"""The PyTorch side: the bundled reference clipper and the JAX/PyTorch parity harness.

The only place in the package that imports torch (``pip install
'aggc_optax[torch]'``). ``reference``: the authors' clipper, written from the
spec (``docs/reference-behaviour.md``); ``parity``: runs it and
:func:`~aggc_optax.from_reference_options` on the same gradients and compares
(``python -m aggc_optax.parity``).
"""

try:
    import torch as _torch  # noqa: F401  # fail here, with the fix, not deep inside a submodule
except ImportError as err:  # pragma: no cover - the test extra installs torch
    raise ImportError(
        "aggc_optax.torch (the PyTorch reference clipper and the parity harness) needs "
        "PyTorch: pip install 'aggc_optax[torch]'"
    ) from err

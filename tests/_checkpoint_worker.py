"""The "fresh process" half of ``tests/test_checkpoint.py`` (not a test module).

Usage: ``python tests/_checkpoint_worker.py CHECKPOINT_DIR OUT.npz``: restores the
``{"params", "opt_state"}`` checkpoint the test wrote mid-run into an abstract target
built with ``jax.eval_shape(tx.init, params)`` (nothing of the writer's state is
reused), runs the remaining steps and saves every leaf of the final ``(params,
opt_state)`` under its key path.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

NUM_STEPS = 6
SAVE_AT = 3


@functools.cache
def build_tx() -> Any:
    """AGGC inside every stateful wrapper that ends up in a checkpoint (built once)."""
    import optax

    import aggc_optax
    from tests._scaleout_common import CONFIGS

    return optax.MultiSteps(
        optax.apply_if_finite(
            optax.chain(
                optax.inject_hyperparams(aggc_optax.aggc)(**CONFIGS["raise"]),
                optax.adamw(0.05),
            ),
            max_consecutive_errors=2,
        ),
        every_k_schedule=1,
    )


def initial_params() -> dict[str, Any]:
    import numpy as np

    from tests._scaleout_common import SHAPES

    return {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}


def trajectory() -> list[dict[str, Any]]:
    from tests._scaleout_common import grad_trajectory

    return grad_trajectory(NUM_STEPS, seed=31)


@functools.cache
def train_step(tx: Any) -> Any:
    """The jitted step, one per transformation (so it compiles once per process)."""
    import jax
    import optax

    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step)


def flatten(tree: Any) -> dict[str, Any]:
    """Every leaf as a NumPy array under its key path."""
    import jax
    import numpy as np

    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def main(checkpoint: str, out_path: str) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    tx = build_tx()
    params = initial_params()
    target = {
        "params": jax.eval_shape(lambda: params),
        "opt_state": jax.eval_shape(tx.init, params),
    }
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(checkpoint, target)
    checkpointer.close()
    params, opt_state = restored["params"], restored["opt_state"]
    step = train_step(tx)
    for g in trajectory()[SAVE_AT:]:
        params, opt_state = step(params, opt_state, g)
    np.savez(out_path, **flatten((params, opt_state)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

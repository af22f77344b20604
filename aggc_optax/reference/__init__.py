"""The authors' clipper, reproduced: the one place that turns on a reference quirk.

``_options``: :func:`from_reference_options`, the reference's option dict
checked and mapped onto the core, with the reference's quirks on;
``recipes``: the authors' two recipes (``presets.lora_sft``, ``presets.grpo``);
``_lora_callback``: :func:`lora_callback_as_ran`, the LoRA callback as the
Hugging Face Trainer actually ran it.
"""

from aggc_optax.reference._lora_callback import LoraCallbackAsRanState, lora_callback_as_ran
from aggc_optax.reference._options import (
    REFERENCE_DEFAULTS,
    InertOptionWarning,
    from_reference_options,
)
from aggc_optax.reference.recipes import GRPO_OPTIONS, LORA_SFT_OPTIONS, grpo, lora_sft

__all__ = [
    "GRPO_OPTIONS",
    "LORA_SFT_OPTIONS",
    "REFERENCE_DEFAULTS",
    "InertOptionWarning",
    "LoraCallbackAsRanState",
    "from_reference_options",
    "grpo",
    "lora_callback_as_ran",
    "lora_sft",
]

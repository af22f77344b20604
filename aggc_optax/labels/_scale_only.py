"""A group label for leaves that are rescaled with a group but not counted in its norm."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScaleOnly:
    """Label a leaf as *scaled with* group ``label`` but *not counted* in its norm.

    A labeler (or a label tree) may return ``ScaleOnly("q_proj")`` instead of
    ``"q_proj"``: the leaf is then multiplied by the group's factor like every
    other member, but its gradient does not enter the group's norm. The authors'
    LoRA callback treats DoRA's ``lora_magnitude_vector`` parameters this way.

    Attributes:
      label: the group whose factor the leaf receives.

    Example:
      >>> ScaleOnly("q_proj").label
      'q_proj'
    """

    label: str

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise TypeError(f"ScaleOnly: label must be a non-empty str, got {self.label!r}")

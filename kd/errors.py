"""The bottom layer: the error every layer raises for bad input, and the names every layer shares.

Imports nothing from kd, so the registries (data, models, methods), the spec and everything above
can use it without a circle (docs/architecture.md, "Layers").
"""

from __future__ import annotations


class SpecError(ValueError):
    """Bad user input: the message is one line naming the problem and the fix."""


TIMM_HUB = "timm"  # init_weights value: timm's ViT-Tiny from the hub (or its local cache)

"""The bottom layer: the error every layer raises for bad input, and the names every layer shares.

Imports nothing from kd, so the registries (data, models, methods), the spec and everything above
can use it without a circle (docs/architecture.md, "Layers").
"""

from __future__ import annotations

from pathlib import Path


class SpecError(ValueError):
    """Bad user input: the message is one line naming the problem and the fix."""


TIMM_HUB = "timm"  # init_weights value: timm's ViT-Tiny from the hub (or its local cache)


def read_text(path: Path, what: str) -> str:
    """A text file the user names (a grid, a crontab), or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{what} {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise SpecError(f"{what} {path} cannot be read ({err.strerror or err}): make it readable by this user") from None


def first_line(text: object, limit: int = 200) -> str:
    """The first line of a message, cut at a word boundary with an ellipsis when longer than `limit`
    (a reason cut mid-word misleads: port 5055 printed as 505)."""
    line = (str(text).splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if cut else line[:limit]) + " ..."

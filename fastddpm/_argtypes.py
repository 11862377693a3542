"""argparse value types shared by the ``fastddpm`` subcommands."""

from __future__ import annotations

import argparse


def int_at_least(low: int, what: str):
    """An argparse ``type`` accepting integers ``>= low``; errors read "expected <what>, got ..."."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")

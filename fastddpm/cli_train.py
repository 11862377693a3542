"""Old import path of :mod:`fastddpm.cli.train`."""

from .cli.train import add_train_parser, run_train

__all__ = ["add_train_parser", "run_train"]

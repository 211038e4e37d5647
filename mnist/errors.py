"""Errors that reach the user as one line instead of a traceback."""

import os
import sys
import traceback
from typing import NoReturn

DEBUG_ENV = "MNIST_DEBUG"  # set it to see the traceback behind an error message


class UserError(Exception):
    """Something the user can fix: missing data, a bad checkpoint path, an impossible setting.

    The command line prints ``error: <message>`` and exits non-zero; set ``MNIST_DEBUG=1`` to see the traceback.
    """


class TrainingInterrupted(Exception):
    """Training was asked to stop (Ctrl-C, SIGTERM) and saved a checkpoint to resume from.

    Args:
        signum: The signal that asked for the stop.
        checkpoint: The checkpoint saved before stopping, or None when checkpointing is off.
    """

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(signum, checkpoint)
        self.signum = signum
        self.checkpoint = checkpoint


def exit_with_message(err: BaseException, code: int = 1) -> NoReturn:
    """End the command with ``error: <err>`` on stderr, the traceback too when MNIST_DEBUG is set."""
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)

"""The one exception type that reaches the user as a message instead of a traceback."""


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

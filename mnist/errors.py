"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Something the user can fix: missing data, a bad checkpoint path, an impossible setting.

    The command line prints ``error: <message>`` and exits non-zero; set ``MNIST_DEBUG=1`` to see the traceback.
    """

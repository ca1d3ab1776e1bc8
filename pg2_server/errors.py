"""The error a command line reports as `error: …` when the machine, not the input, is the problem."""


class SetupError(RuntimeError):
    """This machine or installation cannot do what was asked (a device, a package, a port, a
    helper process); the message says what to install or change."""

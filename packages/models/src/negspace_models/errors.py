"""The one error model resolution raises: its message says what to fix."""


class ModelResolutionError(ValueError):
    """The model setting names nothing loadable; the message says what to fix."""

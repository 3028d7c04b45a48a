"""The one error class a user's mistake raises anywhere in ``export``: ``keras-bn`` prints it in one line, exit 2."""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the user: printed as ``keras-bn: error: ...`` with exit status 2 (a ValueError for callers of
    the Python API, e.g. ``export.check_model``)."""

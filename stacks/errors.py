"""The error of a setting that cannot be used."""


class ConfigError(ValueError):
    """A setting that cannot be used; the message is the one line a user sees."""

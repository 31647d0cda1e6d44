"""User-facing errors: each says what is wrong and what to do about it.

Jobs catch `RocketQAError` and print its message as one line (exit code 2); anything else is a bug
and keeps its traceback.
"""


class RocketQAError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class ConfigError(RocketQAError):
    """Unknown config key, wrong value type, or an invalid combination of settings."""


class DataError(RocketQAError):
    """Malformed or inconsistent input data (names the file and, where it applies, the line)."""


class StageConfigChanged(RocketQAError):
    """A completed pipeline stage is being resumed with a different config."""

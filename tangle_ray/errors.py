"""The one exception type for user mistakes."""


class ConfigError(ValueError):
    """A space, run or search file, an option or a checkpoint that cannot be used as given.

    The message names the source (file or option), the offending value and what is allowed.
    """

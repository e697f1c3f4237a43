"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class PMCError(Exception):
    """A problem the user can fix: bad input, a missing file, an invalid setting."""


class ConfigError(PMCError):
    """A config file or override is wrong; the message names the key."""


class DataError(PMCError):
    """A data file or split is missing, unreadable, or lacks a needed field."""

"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown name, missing file, malformed YAML). Never a traceback."""


class DataNotFound(UserError):
    """A dataset's files are not where genbench looked."""


class WeightsNotFound(UserError):
    """Feature-extractor weights (Inception) are missing and may not be downloaded."""

"""Exceptions for user mistakes: the CLI prints them as one line and exits non-zero."""


class PipelineError(Exception):
    """A problem the user can fix (bad input file, missing column, bad setting).

    The message names the offending file, row or field.
    """

"""The runner's errors: a run that cannot start as asked (nothing ran)."""


class RunSetupError(Exception):
    """The run cannot start as asked (nothing has been executed); the CLI exits with status 2."""


class ParameterError(RunSetupError):
    """A requested parameter is declared by no selected stage or has the wrong type."""

"""The two kinds of failure, which the CLI and the flows treat differently.

- `PipelineError`: a user's mistake (bad config, missing input). It fails the same way every time, so it
  exits with code 2 and the flows do not retry it.
- `InfrastructureError`: something under the job failed (a worker or node lost, storage or network errors,
  training that crashed). A rerun may well succeed and resumes where this one stopped, so it exits with
  code 1 and the flows retry it.

Both are printed as one line naming what failed, never as a traceback.
"""


class PipelineError(Exception):
    """A problem the user can fix (bad input file, missing column, bad setting).

    The message names the offending file, row or field.
    """


class InfrastructureError(Exception):
    """A failure of the machinery under the job (workers, nodes, storage, network): worth a retry.

    The message says what failed and where the work done so far is kept.
    """


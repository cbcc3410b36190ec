"""Errors a run can end with, and the exit code of each (one table, also in docs/checkpoints.md).

| code | meaning | what `jaxscale supervise` does |
|---|---|---|
| 0 | done | stops |
| 2 | a mistake to fix (`UserError`): the message says what to change | stops |
| 3 | training diverged under train.on_nan=stop | stops (the same data would diverge again) |
| 4 | preempted with checkpoints off: nothing was saved | stops (a restart would begin again at step 0) |
| 69 | storage unavailable for now (`TransientError`): a timeout, a refused connection, a 5xx | restarts, backing off |
| 75 | preempted after its checkpoint was committed | restarts from it |
| other | a crash (a bug, or a process killed) | restarts from the newest checkpoint |
"""

DIVERGED_EXIT_CODE = 3
PREEMPTED_UNSAVED_EXIT_CODE = 4
TRANSIENT_EXIT_CODE = 69  # EX_UNAVAILABLE of sysexits.h: "a service is unavailable"
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h: "temporary failure, retry later"


class UserError(Exception):
    """A mistake in config, data or command line, with a message that says what to change: exit code 2."""


class TransientError(Exception):
    """Storage that failed in a way that passes (unavailable, timed out, a server error): exit code 69, retried."""

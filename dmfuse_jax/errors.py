"""Errors shared across the package, and the exit codes of the `dmfuse` commands.

Exit codes (the README's table):
  0    done
  1    an unexpected failure (with its traceback), or a system failure while saving (disk full,
       quota, permission, I/O error: `SaveFailed`, one line); checkpoints committed before it are intact
  2    bad input: a file, folder, config value or checkpoint (`UserError`, one line); also a workdir
       locked by another run, a damaged bundle or export. Nothing was written or changed
  3    training diverged: a non-finite loss or gradient norm (`TrainingDiverged`, one line naming the
       step); no state of that step was saved, the last checkpoint is finite
  75   preempted (SIGTERM, or JAX's preemption notice in multi-host runs): a checkpoint was saved;
       run the same command again (a scheduler requeues on it; EX_TEMPFAIL of sysexits.h)
  130  interrupted (Ctrl-C); `dmfuse train` saved a checkpoint first
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input (file, folder, config, checkpoint).

    The message names the file and the problem; the CLI prints it as one line and exits with code 2.
    """


class CommandFailed(Exception):
    """A failure the command reports as one line (its message) with `exit_code`."""

    exit_code = EXIT_FAILURE


class TrainingDiverged(CommandFailed):
    """The loss or gradient norm became non-finite (exit 3); the message names the step."""

    exit_code = EXIT_DIVERGED


class SaveFailed(CommandFailed):
    """Writing a checkpoint failed for a system reason: disk full, quota, permission, I/O (exit 1)."""

    exit_code = EXIT_FAILURE

"""User-facing errors: the CLI prints their message as one line and exits non-zero (no traceback)."""


class SdesbenchError(Exception):
    """A problem the user can fix (bad name, bad value, bad file). Printed as one line."""

    exit_code = 2


class ConfigError(SdesbenchError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(SdesbenchError):
    """A dataset that is missing, malformed, or fails `sdesbench data check`."""


class CheckpointError(SdesbenchError):
    """A file that is not a checkpoint, or one for another architecture / class count."""


class NumericalFault(SdesbenchError):
    """A NaN/Inf loss: the run stops, keeps its last good checkpoint and is recorded as failed."""

    exit_code = 3


class Interrupted(SdesbenchError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume` continues. Exit status 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunLocked(SdesbenchError):
    """Another process holds the run's lock (two sweeps sharing a results folder)."""


class StorageError(SdesbenchError):
    """A file that cannot be written (disk full) or read back (truncated, not JSON)."""


class DistributedFault(SdesbenchError):
    """Under torchrun: a rank of the process group died or hung (a collective failed or timed out), or the
    launcher ran out of restarts. The run is recorded as failed and keeps its last checkpoint; `--resume`
    continues it (docs/performance.md, "Faults under torchrun")."""

    exit_code = 4


class PeerLost(DistributedFault):
    """A collective failed because another rank of the group died: a consequence, not the cause."""

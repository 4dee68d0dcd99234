"""`sdesbench train --nproc-per-node N [--max-restarts M]`: one run's process group started by torchrun's
own agent (`torch.distributed.launcher.elastic_launch`, what `torchrun --standalone` runs) inside this
process, which also writes the run's record when the group is lost for good.

Who writes what when a rank dies (docs/performance.md, "Faults under torchrun"):
- a rank that fails with one of the suite's errors writes its one line to torchrun's per-rank error file
  (`TORCHELASTIC_ERROR_FILE`, `distributed.write_error_file`), so that torchrun's failure summary, and this
  launcher, show that line and not a traceback;
- rank 0, when a collective fails because another rank died or hangs, records the run as failed with its
  own line (`Trainer`), and keeps the last checkpoint;
- a rank killed by a signal writes nothing: torchrun's agent sees its exit and restarts the whole group while
  restarts are left (the Trainer then continues the checkpoint, `distributed.restart_count`). When none is
  left the agent raises `ChildFailedError` here, and `give_up` records the run as failed with one line that
  names the rank and the signal (or the failed rank's own line), beside the kept checkpoint.

Under a plain `torchrun -m sdesbench train` the parent process is torch's: the record is rank 0's line
(another rank was lost), and torchrun's summary names the rank and signal.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sdesbench.config import RunConfig
from sdesbench.engine import distributed as D
from sdesbench.engine.record import RunRecord, read_record, write_record
from sdesbench.engine.runtime import provenance
from sdesbench.errors import DistributedFault, PeerLost, SdesbenchError, StorageError
from sdesbench.io import load_checkpoint

# the signals torchrun's agent sends to the ranks it stops after another one failed: not a cause
AGENT_SIGNALS = ("SIGTERM", "SIGINT")
# how long at most a rank that lost its peer waits before it exits: torchrun's agent reports ONE failed rank, the
# first exited one its poll finds (torch.multiprocessing's ProcessContext.join), so a rank that noticed the loss
# and exited before the agent's poll saw the dead one (every 0.1 s; seconds later on a loaded machine) would be
# named instead of the rank killed by a signal. Its record and error line are written before it waits, and the
# agent, once it sees the dead rank, stops it with SIGTERM: the wait is that long, not this
PEER_LOST_GRACE_S = 30.0


def rank_main(cfg_dict: dict[str, Any], resume: str, progress: bool) -> RunRecord | None:
    """One rank of the group: train; a suite error goes, as one line, to the elastic error file and the exit
    status (the launcher reports it once, not every rank). Returns rank 0's record."""
    from sdesbench.engine.configure import build_config
    from sdesbench.engine.trainer import train

    try:
        cfg = build_config(cfg_dict)  # loads the run's plugins in this fresh process
        D.init_from_env(cfg.train.dist_timeout_s)
        try:
            rec = train(cfg, resume=resume, show_progress=progress)  # type: ignore[arg-type]
        finally:
            D.cleanup()
    except SdesbenchError as e:
        D.write_error_file(str(e))
        if isinstance(e, PeerLost):  # a consequence: let the agent see the rank that died first (`PEER_LOST_GRACE_S`)
            time.sleep(PEER_LOST_GRACE_S)
        sys.exit(e.exit_code)
    return rec if D.rank() == 0 else None


def launch(cfg: RunConfig, nproc: int, max_restarts: int, resume: str, progress: bool) -> RunRecord:
    """Train `cfg` on `nproc` processes of this machine (gloo on CPU, nccl with one GPU each), restarting the
    group up to `max_restarts` times after a rank is lost (module docstring)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if D.under_torchrun():
        raise SdesbenchError("--nproc-per-node starts its own process group; under torchrun, leave it out "
                             "(torchrun's --nproc-per-node says how many processes)")
    # the agent's own log lines (a rank failed, which processes it stops) would repeat what `give_up` says
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # the ranks are forked from this process, which imports the training code once for all of them and every
    # restart (seconds of CPU each); nothing here has started CUDA or torch's thread pools, which a fork breaks
    import sdesbench.engine.trainer  # noqa: F401
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"sdesbench-{uuid.uuid4().hex[:8]}",
                          max_restarts=max_restarts, monitor_interval=0.1, start_method="fork")
    try:
        results = elastic_launch(config, rank_main)(cfg.to_dict(), resume, progress)
    except ChildFailedError as e:
        raise give_up(cfg, e.failures, max_restarts, nproc) from None
    return results[0]


def cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure that brought the group down: a rank killed by a signal the agent does not send, else the
    earliest failed rank (the others were stopped by the agent, or lost their peer)."""
    def key(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, f = item
        killed = f.exitcode < 0 and f.signal_name() not in AGENT_SIGNALS
        return (0 if killed else 1 if f.exitcode > 0 else 2, f.timestamp, rank)

    return min(failures.items(), key=key)


def give_up(cfg: RunConfig, failures: dict[int, Any], max_restarts: int, nproc: int) -> DistributedFault:
    """Record the run as failed with one line naming the rank and how it ended (keeping its checkpoint) and
    return that line as the error to raise."""
    out = Path(cfg.output.dir)
    rank, failure = cause(failures)
    ckpt = out / "checkpoints" / "last.pt"
    iteration = None
    if ckpt.is_file():
        try:
            iteration = int(load_checkpoint(ckpt).get("iteration", 0))
        except SdesbenchError:
            iteration = None
    restarts = f"no restarts left (--max-restarts {max_restarts})"
    kept = (f"the last checkpoint is kept (iteration {iteration}): continue with --resume" if iteration is not None
            else "no checkpoint had been written yet")
    if failure.exitcode < 0:
        line = f"rank {rank} was killed by {failure.signal_name()}; {restarts}; {kept}"
    elif failure.error_file != "<N/A>" and failure.message:  # the rank's own line (`rank_main`)
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        line = f"rank {rank}: {message}" if not message.startswith("rank ") else message
        if max_restarts:
            line += f" ({restarts})"
    else:
        line = f"rank {rank} exited with status {failure.exitcode}; {restarts}; {kept}"
    try:
        previous = read_record(out)
    except StorageError:
        previous = None
    if previous is not None and previous.completed:  # finished before the group went down: keep it
        return DistributedFault(line)
    if previous is not None:
        record = dataclasses.replace(previous, status="failed", error=line)
    else:
        record = RunRecord(status="failed", error=line, config=cfg.to_dict(), config_hash=cfg.identity_hash(),
                           model=cfg.model.name, method=cfg.method.name, dataset=cfg.data.name,
                           seed=cfg.train.seed, iterations=iteration or 0, world_size=nproc, **provenance())
    out.mkdir(parents=True, exist_ok=True)
    write_record(out, record)
    return DistributedFault(line)

"""Stop requests that reach the trainer when a signal cannot.

SLURM warns a job before its time limit with ``--signal=B:USR1@<seconds>``, delivered to the batch
shell. Passing the signal on by hand does not reach the trainer processes: torchrun's elastic
launcher handles SIGTERM, SIGINT, SIGHUP and SIGQUIT by default (``TORCHELASTIC_SIGNALS_TO_HANDLE``)
by shutting its workers down, with SIGKILL after a 30 s grace period, too short for a large save;
SIGUSR1 would terminate the launcher itself. So the batch script
(``launch/slurm/common.sh``) answers USR1 by creating the file named by ``LONGACT_STOP_FILE`` on
the shared filesystem; the trainer checks for it after every step (all ranks agree through an
all-reduce), saves a checkpoint and exits 0; the script then requeues the job. The script removes
the file before it starts the trainer, so a requeued job trains on.
"""

from __future__ import annotations

import os
from pathlib import Path

STOP_FILE_ENV = "LONGACT_STOP_FILE"


def stop_file_present() -> bool:
    """True when ``$LONGACT_STOP_FILE`` is set and the file exists."""
    name = os.environ.get(STOP_FILE_ENV)
    return bool(name) and Path(name).exists()

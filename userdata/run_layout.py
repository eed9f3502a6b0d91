"""Names that the agent, the local cluster, the stack and `make status` share: a run's name and
the files of its directory, and each node's log stream."""

import re

# A run's name (the run setting, --run): a folder name and an S3 key part.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
COMPLETE_MARKER = "fabric-run.json"  # written when the run has ended well
PROGRESS_FILE = "progress.json"  # written by the script, shown by `make status`
# A checkpoint whose name says its step (trainer/, examples/): the newest is restored first.
CHECKPOINT_STEP = re.compile(r"step-(\d+)\.ckpt$")
LOG_STREAM_PREFIX = "node-"  # each node's CloudWatch Logs stream: node-<rank>


def log_stream(rank: int) -> str:
    return f"{LOG_STREAM_PREFIX}{rank}"

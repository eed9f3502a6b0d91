"""Names that the agent, the local cluster, the stack and `make status` share: a run's name and
the files of its directory, and each node's log stream."""

import re
from fnmatch import fnmatchcase
from pathlib import PurePosixPath

# A run's name (the run setting, --run): a folder name and an S3 key part.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
COMPLETE_MARKER = "fabric-run.json"  # written when the run has ended well
# The script's arguments the run was started (or last continued) with: a run continued
# without arguments uses them; with new ones, those (and records them).
RUN_ARGS_FILE = "fabric-args.json"
PROGRESS_FILE = "progress.json"  # written by the script, shown by `make status`
# A checkpoint whose name says its step (trainer/, examples/): the newest is restored first.
CHECKPOINT_STEP = re.compile(r"step-(\d+)\.ckpt$")
CHECKPOINT_GLOB = "step-*.ckpt"  # the trainer's checkpoints (trainer/train.py)
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")  # any script's, under a checkpoints/ folder
CHECKPOINT_FOLDER = "checkpoints"
LOG_STREAM_PREFIX = "node-"  # each node's CloudWatch Logs stream: <stack>/node-<rank>


def log_stream(rank: int, stack: str = "") -> str:
    """The clusters of a storage stack share its log group: a stream per node of each."""
    return f"{stack}/{LOG_STREAM_PREFIX}{rank}" if stack else f"{LOG_STREAM_PREFIX}{rank}"


def checkpoint_of(relative: PurePosixPath) -> str | None:
    """The checkpoint a file of the run belongs to, as its path in the run, or None for a file
    that is not part of one: the trainer's step-*.ckpt anywhere, any *.ckpt, *.pt or *.pth
    under a checkpoints/ folder. A checkpoint may be a folder (torch.distributed.checkpoint
    writes shards into one): every file under it belongs to it."""
    parts = relative.parts
    for index, part in enumerate(parts):
        if fnmatchcase(part, CHECKPOINT_GLOB) or (
            CHECKPOINT_FOLDER in parts[:index] and part.endswith(CHECKPOINT_SUFFIXES)
        ):
            return "/".join(parts[: index + 1])
    return None

"""Names in a run's directory that the agent, the local cluster and `make status` share."""

COMPLETE_MARKER = "fabric-run.json"  # written when the run has ended well
PROGRESS_FILE = "progress.json"  # written by the script, shown by `make status`

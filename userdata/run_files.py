"""The run's files in S3 around training: its state, read once before training (unreadable is
one clear line), the script arguments it goes on with, and what the script writes in the
project folder, kept with the run (node 0)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from boto3.exceptions import RetriesExceededError
from botocore.exceptions import BotoCoreError, ClientError

from userdata.agent_log import log
from userdata.artifacts import ArtifactSync
from userdata.errors import AgentError
from userdata.outputs import OUTPUTS, Snapshot, outputs, snapshot
from userdata.run_state import record_args, recorded_args

T = TypeVar("T")


def run_state(action: Callable[[], T], uri: str) -> T:
    """The run's state in S3, read once before training: unreadable is one clear line."""
    try:
        return action()
    except (BotoCoreError, ClientError, RetriesExceededError, OSError) as error:
        raise AgentError(f"cannot read the run's files in {uri}/: {error}") from None


def script_arguments(s3: object, args: argparse.Namespace) -> list[str]:
    """The deploy's script arguments; none given: the ones the run was started with."""
    if args.script_args:
        return list(args.script_args)
    recorded = recorded_args(s3, args.artifacts_uri)
    if recorded:
        log(f"run {args.run_name}: continued with its recorded arguments: {shlex.join(recorded)}")
    return recorded or []


def begin_run(s3: object, args: argparse.Namespace, given: bool) -> None:
    """Node 0, before training: the arguments given are the run's from now on."""
    if given and recorded_args(s3, args.artifacts_uri) != args.script_args:
        record_args(s3, args.artifacts_uri, args.script_args)


@dataclass
class KeptOutputs:
    """Node 0: what the script writes by relative path in the project folder (not what
    shipped), kept with the run under outputs/ (userdata/outputs.py)."""

    workdir: Path
    before: Snapshot
    sync: ArtifactSync

    @classmethod
    def start(cls, s3: object, args: argparse.Namespace) -> KeptOutputs | None:
        if not args.workdir:
            return None
        workdir = Path(args.workdir)
        before = snapshot(workdir)
        uri = f"{args.artifacts_uri}/{OUTPUTS}"

        def files() -> list[Path]:
            return outputs(workdir, before).files

        kept = cls(workdir, before, ArtifactSync(s3, uri, workdir, args.sync_interval, files=files))
        kept.sync.start()
        return kept

    def finish(self, interrupted: bool) -> None:
        uploaded = self.sync.stop_now() if interrupted else f"{self.sync.stop()} file(s) uploaded"
        skipped = outputs(self.workdir, self.before).skipped
        if skipped:
            log(f"outputs: left out {len(skipped)} file(s): {'; '.join(skipped[:5])}")
        log(f"outputs (what the script wrote in {self.workdir}): {uploaded}")

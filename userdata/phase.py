"""Records the node's phase in its SSM parameter, where a user can read it from outside.

A phase value says whose it is: `{"phase": "training", "instance": "i-0abc..."}`. During a
redeploy CloudFormation runs the old and the new nodes side by side, both writing the same
parameters; readers (the other nodes, `make status`) keep only the values written by the
instance that now holds the rank. The stack's initial value (`booting`) is plain text and
has no writer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from userdata.masking import Masker

MAX_PHASE_LENGTH = 1024


@dataclass(frozen=True)
class Phase:
    text: str
    instance: str | None  # the writer; None for the stack's initial value


def encode_phase(text: str, instance: str | None) -> str:
    text = " ".join(text.split())[:MAX_PHASE_LENGTH]
    if not instance:
        return text
    # SSM counts characters (4096 for a standard parameter): no six-character escapes.
    return json.dumps({"phase": text, "instance": instance}, ensure_ascii=False)


def decode_phase(value: str) -> Phase:
    """Any value decodes: one that is not ours is a phase without a writer."""
    try:
        data = json.loads(value)
    except ValueError:
        return Phase(value, None)
    if not isinstance(data, dict) or not isinstance(data.get("phase"), str):
        return Phase(value, None)
    instance = data.get("instance")
    return Phase(data["phase"], instance if isinstance(instance, str) else None)


class PhaseReporter:
    def __init__(self, ssm: Any | None, parameter: str | None, instance: str | None = None):
        self.ssm = ssm
        self.parameter = parameter
        self.instance = instance
        self.silenced = ""  # why this node writes no more phases (another instance holds its rank)
        self.masker = Masker()  # the secrets' values, never in a phase (a script's error line)

    def record(self, phase: str) -> None:
        """Never raises: a phase that cannot be recorded must not stop training."""
        phase = " ".join(self.masker.mask(phase).split())[:MAX_PHASE_LENGTH]
        print(f"[fabric-agent] phase: {phase}", flush=True)
        if self.ssm is None or not self.parameter:
            return
        if self.silenced:
            print(f"[fabric-agent] phase not recorded: {self.silenced}", flush=True)
            return
        try:
            self.ssm.put_parameter(
                Name=self.parameter,
                Value=encode_phase(phase, self.instance),
                Type="String",
                Overwrite=True,
            )
        except (BotoCoreError, ClientError) as error:
            print(
                f"[fabric-agent] could not record phase in {self.parameter}: {error}",
                file=sys.stderr,
                flush=True,
            )

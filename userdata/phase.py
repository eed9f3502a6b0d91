"""Records the node's phase in its SSM parameter, where a user can read it from outside."""

from __future__ import annotations

import sys
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

MAX_PHASE_LENGTH = 1024


class PhaseReporter:
    def __init__(self, ssm: Any | None, parameter: str | None) -> None:
        self.ssm = ssm
        self.parameter = parameter

    def record(self, phase: str) -> None:
        """Never raises: a phase that cannot be recorded must not stop training."""
        phase = " ".join(phase.split())[:MAX_PHASE_LENGTH]
        print(f"[fabric-agent] phase: {phase}", flush=True)
        if self.ssm is None or not self.parameter:
            return
        try:
            self.ssm.put_parameter(Name=self.parameter, Value=phase, Type="String", Overwrite=True)
        except (BotoCoreError, ClientError) as error:
            print(
                f"[fabric-agent] could not record phase in {self.parameter}: {error}",
                file=sys.stderr,
                flush=True,
            )

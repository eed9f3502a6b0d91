#!/usr/bin/env python3
"""The CDK app: settings from cdk.json context and -c overrides, the cluster stack, synth."""

import os
import sys
from pathlib import Path

VENV_PYTHON = Path(__file__).resolve().parent / ".venv" / "bin" / "python"

try:
    import aws_cdk  # noqa: F401
except ImportError:
    # cdk.json runs `python3 app.py`: hand over to the project's venv, which has the CDK.
    if VENV_PYTHON.exists() and Path(sys.executable) != VENV_PYTHON:
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])
    print("error: aws-cdk-lib is not installed: run `make venv` (it makes .venv)", file=sys.stderr)
    sys.exit(1)

from stacks.cluster_app import build_app, synthesize  # noqa: E402
from stacks.config import ConfigError  # noqa: E402

try:
    synthesize(*build_app())
except ConfigError as error:
    # One line, no traceback, and no template to deploy.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)

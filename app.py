#!/usr/bin/env python3
"""The CDK app: settings from cdk.json context and -c overrides, the cluster stack, synth."""

import sys

from stacks.cluster_app import build_app
from stacks.config import ConfigError

try:
    app, _ = build_app()
except ConfigError as error:
    # One line, no traceback, and nothing synthesized.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
app.synth()

"""Builds the CDK app: settings from context, the cluster stack and cdk-nag's checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from stacks.cluster_stack import ClusterStack
from stacks.config import PROJECT_DIR, load_config


def cdk_json_context(**overrides: Any) -> dict[str, Any]:
    """cdk.json's context (what the CLI passes in) with overrides, as -c would set them."""
    context = json.loads((PROJECT_DIR / "cdk.json").read_text())["context"]
    context.update(overrides)
    return context


def build_app(
    context: Mapping[str, Any] | None = None, outdir: str | None = None
) -> tuple[cdk.App, ClusterStack]:
    """Raises ConfigError before any construct is made when a setting is bad."""
    app = cdk.App(context=dict(context) if context is not None else None, outdir=outdir)
    config = load_config(app.node.try_get_context)
    stack = ClusterStack(app, "FabricCluster", config=config)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stack

"""Builds the CDK app: settings from context, the storage and cluster stacks, cdk-nag's checks.

The CLI names the stacks by these ids (`cdk deploy FabricCluster` deploys the storage first;
`cdk destroy FabricCluster` removes the cluster only); their CloudFormation names are the
stack_name and storage_stack settings."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from stacks.cluster_stack import ClusterStack
from stacks.config import PROJECT_DIR, ConfigError, check_known_settings, load_config
from stacks.storage_stack import StorageStack

# CloudFormation takes templates up to 1 MB (from S3, as cdk deploy uploads large ones). The user
# data is in the template once (the launch template), but every node adds its resources and
# outputs: a template over the limit would fail at deploy, after minutes.
TEMPLATE_LIMIT_BYTES = 1_000_000
CLUSTER_STACK_ID = "FabricCluster"
STORAGE_STACK_ID = "FabricStorage"


def cdk_json_context(**overrides: Any) -> dict[str, Any]:
    """cdk.json's context (what the CLI passes in) with overrides, as -c would set them."""
    context = json.loads((PROJECT_DIR / "cdk.json").read_text())["context"]
    context.update(overrides)
    return context


def context_keys(context: Mapping[str, Any] | None) -> set[str]:
    """Every context key: the CLI passes cdk.json, cdk.context.json and -c in CDK_CONTEXT_JSON."""
    keys = set(context or {})
    keys |= set(json.loads(os.environ.get("CDK_CONTEXT_JSON") or "{}"))
    return keys


def deploy_environment() -> cdk.Environment | None:
    """The account and region of the CLI's credentials: with them the AMI and the AZ are looked
    up once and recorded in cdk.context.json; without them (offline synth) the stack is
    environment-agnostic."""
    account = os.environ.get("CDK_DEFAULT_ACCOUNT")
    region = os.environ.get("CDK_DEFAULT_REGION")
    return cdk.Environment(account=account, region=region) if account and region else None


def build_app(
    context: Mapping[str, Any] | None = None, outdir: str | None = None
) -> tuple[cdk.App, ClusterStack]:
    """Raises ConfigError before any construct is made when a setting is bad."""
    app = cdk.App(context=dict(context) if context is not None else None, outdir=outdir)
    check_known_settings(context_keys(context))
    config = load_config(app.node.try_get_context)
    environment = deploy_environment()
    storage = StorageStack(app, STORAGE_STACK_ID, config=config, env=environment)
    stack = ClusterStack(app, CLUSTER_STACK_ID, config=config, env=environment)
    stack.add_stack_dependency(storage)  # deploying the cluster deploys the storage first
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stack


def synthesize(app: cdk.App, stack: ClusterStack) -> Path:
    """app.synth(), then CloudFormation's size limit: a template over it is removed (the CLI
    never deploys it) and is one line; returns the template's path."""
    assembly = app.synth()
    template = Path(assembly.directory) / assembly.get_stack_by_name(stack.stack_name).template_file
    size = template.stat().st_size
    if size > TEMPLATE_LIMIT_BYTES:
        for made in Path(assembly.directory).glob("*.template.json"):  # no half of an app
            made.unlink()
        config = stack.config
        raise ConfigError(
            f"invalid settings num_nodes={config.num_nodes} with these script_args: the template "
            f"would be {size} bytes, over CloudFormation's limit of {TEMPLATE_LIMIT_BYTES}; use "
            "fewer nodes or put long arguments in a file of the project"
        )
    return template

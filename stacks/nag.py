"""Findings of cdk-nag and checkov acknowledged where the resource is made, with the reason."""

from __future__ import annotations

import aws_cdk as cdk
from constructs import Construct


def ack(scope: Construct, rule: str, reason: str) -> None:
    cdk.Validations.of(scope).acknowledge(cdk.Acknowledgment(id=rule, reason=reason))


def checkov_skip(scope: Construct, *skips: tuple[str, str]) -> None:
    """Findings of checkov (which reads the template) acknowledged in the template itself."""
    resource = scope.node.default_child if not isinstance(scope, cdk.CfnResource) else scope
    resource.add_metadata(  # type: ignore[union-attr]
        "checkov", {"skip": [{"id": rule, "comment": reason} for rule, reason in skips]}
    )

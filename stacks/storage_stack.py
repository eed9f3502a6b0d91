"""The long-lived storage of every cluster in an account and region: the artifacts bucket (each
cluster's runs under s3://<bucket>/<stack>/<run>/) and the nodes' log group (a stream per node,
<stack>/node-<rank>). Cluster stacks come and go (`make destroy`); this one stays, so a
cluster deployed again continues its runs with no setting. Only `make destroy-storage` deletes
it, and what it holds, after saying what that is.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stacks.config import ClusterConfig
from stacks.nag import ack, checkov_skip

NONCURRENT_VERSION_DAYS = 30
ACCESS_LOGGING_REASON = (
    "Only the clusters' node role reads and writes here; a log bucket would outlive it and "
    "bill for logs nobody reads. CloudTrail data events cover access when needed."
)


def bucket_export(storage_stack: str) -> str:
    return f"{storage_stack}-ArtifactsBucket"


def log_group_export(storage_stack: str) -> str:
    return f"{storage_stack}-LogGroup"


class StorageStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        env: cdk.Environment | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=env,
            stack_name=config.storage_stack,
            description="Lightning Fabric clusters' storage: the runs' bucket and the nodes' logs",
        )
        self.bucket = self._artifacts_bucket()
        self.log_group = self._log_group(config.log_retention_days)
        # Exported by names of their own: the cluster stacks import them by name, and
        # CloudFormation refuses to delete this stack while one does.
        cdk.CfnOutput(
            self,
            "ArtifactsBucket",
            value=self.bucket.bucket_name,
            export_name=bucket_export(config.storage_stack),
        )
        cdk.CfnOutput(
            self,
            "LogGroup",
            value=self.log_group.log_group_name,
            export_name=log_group_export(config.storage_stack),
        )

    def _artifacts_bucket(self) -> s3.Bucket:
        bucket = s3.Bucket(
            self,
            "Artifacts",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            # An overwritten or torn upload can be recovered; old versions expire so that
            # rewritten checkpoints do not bill forever.
            versioned=True,
            lifecycle_rules=[
                s3.LifecycleRule(
                    noncurrent_version_expiration=cdk.Duration.days(NONCURRENT_VERSION_DAYS),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                )
            ],
            # Even a `cdk destroy` of this stack keeps the runs: make destroy-storage deletes.
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        checkov_skip(bucket, ("CKV_AWS_18", ACCESS_LOGGING_REASON))
        ack(bucket, "AwsSolutions-S1", ACCESS_LOGGING_REASON)
        return bucket

    def _log_group(self, retention_days: int) -> logs.LogGroup:
        """Every node's boot, agent and training output, a stream per node of every cluster."""
        group = logs.LogGroup(self, "Logs", removal_policy=cdk.RemovalPolicy.RETAIN)
        # In days, as the setting says (CDK's RetentionDays names them instead).
        group.node.default_child.retention_in_days = retention_days  # type: ignore[union-attr]
        checkov_skip(
            group,
            ("CKV_AWS_158", "Encrypted by CloudWatch Logs' own key; no customer key to manage."),
            ("CKV_AWS_338", "Retention is the log_retention_days setting (default 30 days)."),
        )
        return group

"""Helpers for tests that synthesize the app and read its CloudFormation template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from aws_cdk.assertions import Template

from stacks.cluster_app import STORAGE_STACK_ID, build_app, cdk_json_context, synthesize
from stacks.config import PROJECT_DIR

CHECKOV = PROJECT_DIR / ".venv-checkov" / "bin" / "checkov"


class Synth:
    """One synthesized app: the template, the validation report and the assembly folder."""

    def __init__(self, outdir: Path, **overrides: Any) -> None:
        app, self.stack = build_app(cdk_json_context(**overrides), outdir=str(outdir))
        synthesize(app, self.stack)  # raises when a validation plugin (cdk-nag) reports an error
        self.outdir = outdir
        self.template_path = outdir / f"{self.stack.artifact_id}.template.json"
        self.template_dict: dict[str, Any] = json.loads(self.template_path.read_text())
        self.template = Template.from_json(self.template_dict)
        self.storage_dict: dict[str, Any] = json.loads(self.storage_path.read_text())
        self.storage = Template.from_json(self.storage_dict)
        self.report = json.loads((outdir / "validation-report.json").read_text())

    def resources(
        self, resource_type: str, template: dict[str, Any] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The cluster template's resources of a type (or another template's: storage_dict)."""
        return {
            logical_id: resource
            for logical_id, resource in (template or self.template_dict)["Resources"].items()
            if resource["Type"] == resource_type
        }

    @property
    def storage_path(self) -> Path:
        return self.outdir / f"{STORAGE_STACK_ID}.template.json"

    def instances_by_rank(self) -> list[dict[str, Any]]:
        def rank(resource: dict[str, Any]) -> int:
            tags = {tag["Key"]: tag["Value"] for tag in resource["Properties"]["Tags"]}
            return int(tags["fabric:node-rank"])

        return sorted(self.resources("AWS::EC2::Instance").values(), key=rank)

    def nodes_security_group(self) -> tuple[str, dict[str, Any]]:
        """The security group every node is in (the file system has one of its own): the
        instance's, or with EFA its launch template's network interface's."""
        properties = self.instances_by_rank()[0]["Properties"]
        if "SecurityGroupIds" in properties:
            (group,) = properties["SecurityGroupIds"]
        else:
            data = self.launch_template()["Properties"]["LaunchTemplateData"]
            (group,) = data["NetworkInterfaces"][0]["Groups"]
        group_id = group["Fn::GetAtt"][0]
        return group_id, self.template_dict["Resources"][group_id]

    def ingress_rules(self, group_id: str) -> list[dict[str, Any]]:
        """The separate ingress rules (AWS::EC2::SecurityGroupIngress) of one group."""
        return [
            rule["Properties"]
            for rule in self.resources("AWS::EC2::SecurityGroupIngress").values()
            if rule["Properties"]["GroupId"] == {"Fn::GetAtt": [group_id, "GroupId"]}
        ]

    def launch_template(self) -> dict[str, Any]:
        """The one launch template every node starts from (it carries the user data)."""
        (template,) = self.resources("AWS::EC2::LaunchTemplate").values()
        return template

    def violations(self, plugin: str) -> list[dict[str, Any]]:
        return [
            violation
            for report in self.report["pluginReports"]
            if report["pluginName"] == plugin
            for violation in report["violations"]
        ]


_SYNTHS: dict[str, Synth] = {}


def synthesized(tmp_path_factory: Any, **overrides: Any) -> Synth:
    """The app synthesized with these settings once for the whole test run (in each pytest-xdist
    worker): for tests that only read what it made."""
    key = json.dumps(overrides, sort_keys=True)
    if key not in _SYNTHS:
        _SYNTHS[key] = Synth(tmp_path_factory.mktemp("synth"), **overrides)
    return _SYNTHS[key]


def join_text(value: Any, placeholder: str = "PLACEHOLDER") -> str:
    """Flattens an Fn::Join (as used for user data) into text, intrinsics as a placeholder."""
    if isinstance(value, str):
        return value
    if "Fn::Base64" in value:
        return join_text(value["Fn::Base64"], placeholder)
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(join_text(part, placeholder) for part in parts)
    return placeholder


def user_data_text(resource: dict[str, Any], placeholder: str = "PLACEHOLDER") -> str:
    """The user data of an instance, or of the launch template that carries it for all."""
    properties = resource["Properties"]
    user_data = properties.get("UserData") or properties["LaunchTemplateData"]["UserData"]
    return join_text(user_data, placeholder)


def checkov(*templates: Path) -> dict[str, Any]:
    """checkov's CloudFormation results for templates, offline: no guideline download, no
    update check, and no network at all where this runs as root (a namespace of its own).
    One run for all of them (checkov's start costs seconds); each result names its file."""
    assert CHECKOV.exists(), "run the tests with `make test`: it installs checkov"
    command = [str(CHECKOV), *(arg for t in templates for arg in ("--file", str(t)))]
    command += ["--framework", "cloudformation", "--output", "json", "--skip-download"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        command = ["unshare", "--net", *command]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    files = {check["file_abs_path"] for kind in ("passed_checks", "failed_checks")
             for check in report["results"].get(kind, [])}  # fmt: skip
    assert files == {str(t.resolve()) for t in templates}, files  # every template was read
    return report


def assert_lint_clean(*synths: Synth) -> None:
    """cdk-nag (during the synth), cfn-lint and checkov find nothing in these templates."""
    for synth in synths:
        assert synth.violations("AwsSolutions") == []
        result = subprocess.run(
            [str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable",
             str(synth.template_path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    results = checkov(*(synth.template_path for synth in synths))["results"]
    assert [(c["check_id"], c["resource"]) for c in results["failed_checks"]] == []

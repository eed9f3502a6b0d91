"""Assertions on the synthesized template, for the defaults and for a 4-node GPU cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Match

from stacks.network import VPC_CIDR
from stacks.node_role import SESSION_MANAGER_ACTIONS
from stacks.nodes import GPU_AMI_PARAMETER, UBUNTU_AMI_PARAMETER
from stacks.storage_stack import NONCURRENT_VERSION_DAYS
from tests.cfn import Synth, checkov, synthesized, user_data_text

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu4": {
        "num_nodes": 4,
        "accelerator": "gpu",
        "instance_type": "g5.xlarge",
        "devices_per_node": "1",
        "script_args": "--epochs 3 --note 'a b'",
        "stop_when_done": "false",
        "main_port": "29500",
    },
}
EXPECTED = {
    "defaults": {"nodes": 2, "type": "t2.large", "placement": False},
    "gpu4": {"nodes": 4, "type": "g5.xlarge", "placement": True},
}
RENDERED = {
    "defaults": {
        "ACCELERATOR": "cpu",
        "DEVICES_PER_NODE": "2",
        "MAIN_PORT": "29400",
        "STOP_WHEN_DONE": "true",
        "PRECISION": "32-true",
        "ARGS": [],
    },
    "gpu4": {
        "ACCELERATOR": "gpu",
        "DEVICES_PER_NODE": "1",
        "MAIN_PORT": "29500",
        "STOP_WHEN_DONE": "false",
        "PRECISION": "bf16-mixed",
        "ARGS": ["--epochs", "3", "--note", "a b"],
    },
}


@pytest.fixture(scope="module", params=list(CASES))
def synth(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synth:
    synth = synthesized(tmp_path_factory, **CASES[request.param])
    synth.case = request.param  # type: ignore[attr-defined]
    return synth


def expected(synth: Synth) -> dict[str, Any]:
    return EXPECTED[synth.case]  # type: ignore[attr-defined]


def test_vpc_has_one_public_subnet_and_no_nat(synth: Synth) -> None:
    synth.template.resource_count_is("AWS::EC2::VPC", 1)
    synth.template.has_resource_properties("AWS::EC2::VPC", {"CidrBlock": VPC_CIDR})
    synth.template.resource_count_is("AWS::EC2::Subnet", 1)
    synth.template.has_resource_properties("AWS::EC2::Subnet", {"MapPublicIpOnLaunch": True})
    synth.template.resource_count_is("AWS::EC2::NatGateway", 0)
    subnet_id = next(iter(synth.resources("AWS::EC2::Subnet")))
    for node in synth.instances_by_rank():
        assert node["Properties"]["SubnetId"] == {"Ref": subnet_id}


def test_security_group_allows_ssh_from_vpc_and_all_tcp_between_nodes(synth: Synth) -> None:
    group_id, group = synth.nodes_security_group()
    inline = group["Properties"]["SecurityGroupIngress"]
    assert inline == [
        {
            "CidrIp": VPC_CIDR,
            "Description": "SSH",
            "FromPort": 22,
            "IpProtocol": "tcp",
            "ToPort": 22,
        }
    ]
    separate = synth.ingress_rules(group_id)
    assert len(separate) == 1
    rule = separate[0]
    assert rule["IpProtocol"] == "tcp"
    assert (rule["FromPort"], rule["ToPort"]) == (0, 65535)
    assert rule["SourceSecurityGroupId"] == {"Fn::GetAtt": [group_id, "GroupId"]}
    assert rule["GroupId"] == {"Fn::GetAtt": [group_id, "GroupId"]}


def test_instances_run_ubuntu_with_imdsv2_tags_and_encrypted_gp3(synth: Synth) -> None:
    nodes = synth.instances_by_rank()
    assert len(nodes) == expected(synth)["nodes"]
    image_parameter = synth.template_dict["Parameters"][nodes[0]["Properties"]["ImageId"]["Ref"]]
    gpu = synth.case == "gpu4"  # type: ignore[attr-defined]
    assert image_parameter["Default"] == (GPU_AMI_PARAMETER if gpu else UBUNTU_AMI_PARAMETER)
    assert image_parameter["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    for rank, node in enumerate(nodes):
        props = node["Properties"]
        assert props["InstanceType"] == expected(synth)["type"]
        assert props["MetadataOptions"] == {
            "HttpTokens": "required",
            "InstanceMetadataTags": "enabled",
        }
        assert props["BlockDeviceMappings"] == [
            {
                "DeviceName": "/dev/sda1",
                "Ebs": {
                    "DeleteOnTermination": True,
                    "Encrypted": True,
                    "VolumeSize": 150 if gpu else 50,
                    "VolumeType": "gp3",
                },
            }
        ]
        assert props["InstanceInitiatedShutdownBehavior"] == "stop"
        tags = {tag["Key"]: tag["Value"] for tag in props["Tags"]}
        assert tags["fabric:node-rank"] == str(rank)
        assert tags["fabric:num-nodes"] == str(len(nodes))
        assert "KeyName" not in props


def test_rank_tags_are_zero_to_n_minus_one(synth: Synth) -> None:
    ranks = sorted(
        int({t["Key"]: t["Value"] for t in r["Properties"]["Tags"]}["fabric:node-rank"])
        for r in synth.resources("AWS::EC2::Instance").values()
    )
    assert ranks == list(range(expected(synth)["nodes"]))


def test_user_data_is_identical_on_every_node(synth: Synth) -> None:
    """Rendered once, in the launch template every node starts from (inlined per node, 64
    copies would pass CloudFormation's 1 MB template limit)."""
    ((template_id, _),) = synth.resources("AWS::EC2::LaunchTemplate").items()
    for node in synth.instances_by_rank():
        assert "UserData" not in node["Properties"]
        assert node["Properties"]["LaunchTemplate"] == {
            "LaunchTemplateId": {"Ref": template_id},
            "Version": {"Fn::GetAtt": [template_id, "LatestVersionNumber"]},
        }
    assert user_data_text(synth.launch_template()).startswith("#!/bin/bash\n")


def test_placement_group_only_where_supported(synth: Synth) -> None:
    groups = synth.resources("AWS::EC2::PlacementGroup")
    if expected(synth)["placement"]:
        ((group_id, group),) = groups.items()
        assert group["Properties"]["Strategy"] == "cluster"
        for node in synth.instances_by_rank():
            assert node["Properties"]["PlacementGroupName"] == {
                "Fn::GetAtt": [group_id, "GroupName"]
            }
    else:
        assert groups == {}
        assert all("PlacementGroupName" not in n["Properties"] for n in synth.instances_by_rank())


def test_main_address_parameter_is_node0_private_ip(synth: Synth) -> None:
    node0 = next(
        logical_id
        for logical_id, r in synth.resources("AWS::EC2::Instance").items()
        if {"Key": "fabric:node-rank", "Value": "0"} in r["Properties"]["Tags"]
    )
    synth.template.has_resource_properties(
        "AWS::SSM::Parameter",
        {
            "Name": "/fabric/FabricCluster/main-address",
            "Type": "String",
            "Value": {"Fn::GetAtt": [node0, "PrivateIp"]},
        },
    )


def test_artifacts_bucket_is_private_encrypted_tls_only_and_retained(synth: Synth) -> None:
    """In the storage stack: the cluster stack has no bucket of its own (it imports it)."""
    assert synth.resources("AWS::S3::Bucket") == {}
    ((bucket_id, bucket),) = synth.resources("AWS::S3::Bucket", synth.storage_dict).items()
    assert bucket["DeletionPolicy"] == "Retain"
    assert bucket["UpdateReplacePolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert (
        props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
            "ServerSideEncryptionByDefault"
        ]["SSEAlgorithm"]
        == "AES256"
    )
    synth.storage.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "Bucket": {"Ref": bucket_id},
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Effect": "Deny",
                                "Action": "s3:*",
                                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                            }
                        )
                    ]
                )
            },
        },
    )


def _as_list(value: Any) -> list[Any]:
    """IAM takes one string or a list for Action and Resource."""
    return value if isinstance(value, list) else [value]


def _policy_statements(synth: Synth) -> list[dict[str, Any]]:
    """Every statement of the node role, Action and Resource as lists."""
    return [
        {
            **statement,
            "Action": _as_list(statement["Action"]),
            "Resource": _as_list(statement["Resource"]),
        }
        for policy in synth.resources("AWS::IAM::Policy").values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def test_role_is_least_privilege(synth: Synth) -> None:
    ((_, role),) = synth.resources("AWS::IAM::Role").items()
    # No managed policy: AmazonSSMManagedInstanceCore allows ssm:GetParameter(s) on "*".
    assert "ManagedPolicyArns" not in role["Properties"]
    statements = _policy_statements(synth)
    for statement in statements:
        actions = statement["Action"]
        assert "*" not in actions and not any(a.endswith(":*") for a in actions), statement
        if "*" in statement["Resource"]:
            assert not any(a.startswith("ssm:GetParameter") for a in actions), statement
    session = [s for s in statements if "ssmmessages:OpenDataChannel" in s["Action"]]
    assert len(session) == 1 and set(session[0]["Action"]) == set(SESSION_MANAGER_ACTIONS)
    # Nodes read only the cluster-wide parameters (main address, members, stop): never each
    # other's phases, so the control plane's calls grow with N, not N squared.
    reads = [s for s in statements if any(a.startswith("ssm:GetParameter") for a in s["Action"])]
    assert len(reads) == 1
    assert sorted(reads[0]["Action"]) == ["ssm:GetParameter", "ssm:GetParameters"]
    read_names = sorted(
        json.dumps(r).split(":parameter/")[-1].split('"')[0] for r in reads[0]["Resource"]
    )
    assert read_names == [
        "fabric/FabricCluster/main-address",
        "fabric/FabricCluster/members",
        "fabric/FabricCluster/stop",
    ]
    put_parameter = [s for s in statements if "ssm:PutParameter" in s["Action"]]
    assert len(put_parameter) == 1
    parameters = synth.resources("AWS::SSM::Parameter")
    phase_ids = {
        logical_id
        for logical_id, r in parameters.items()
        if r["Properties"]["Name"].endswith("/phase")
    }
    assert len(phase_ids) == expected(synth)["nodes"]
    (stop_id,) = [i for i, r in parameters.items() if r["Properties"]["Name"].endswith("/stop")]
    assert {
        json.dumps(r).split('"Ref": "')[-1].split('"')[0] for r in put_parameter[0]["Resource"]
    } == phase_ids | {stop_id}
    # Nothing on a node deletes data (ec2messages:DeleteMessage only acknowledges an agent message).
    deletes = [a for s in statements for a in s["Action"] if "Delete" in a]
    assert deletes == ["ec2messages:DeleteMessage"], deletes
    writes = [s for s in statements if "s3:PutObject" in s["Action"]]
    assert len(writes) == 1
    # The storage stack's bucket, imported by its export's name.
    imported = '{"Fn::ImportValue": "FabricStorage-ArtifactsBucket"}'
    assert imported in json.dumps(writes[0]["Resource"])
    assert "cdk-hnb659fds-assets" not in json.dumps(writes[0]["Resource"])


def test_policy_statement_checks_see_one_string_actions() -> None:
    """A one-string Action is one action, not a string of characters."""
    statement = {"Action": "s3:DeleteObject", "Resource": "*"}
    normalized = {"Action": _as_list(statement["Action"]), "Resource": ["*"]}
    assert [a for a in normalized["Action"] if "Delete" in a] == ["s3:DeleteObject"]
    assert normalized["Action"] == ["s3:DeleteObject"]


def test_payload_is_an_s3_asset_with_the_project_and_the_agent(synth: Synth) -> None:
    assets = json.loads((synth.outdir / f"{synth.stack.artifact_id}.assets.json").read_text())
    zips = [a for a in assets["files"].values() if a["source"]["packaging"] == "zip"]
    assert len(zips) == 1
    folder = synth.outdir / zips[0]["source"]["path"]
    project = sorted(
        p.relative_to(folder / "project").as_posix() for p in (folder / "project").rglob("*")
    )
    assert project == ["__init__.py", "requirements.txt", "train.py"]  # the example project
    assert (folder / "userdata" / "agent.py").is_file()
    assert (folder / "userdata" / "requirements-node.txt").is_file()
    assert (folder / "training_project" / "dependencies.py").is_file()  # install.sh's step
    assert sorted(p.name for p in folder.iterdir()) == [
        "inputs.json",  # the run's inputs: none by default
        "project",
        "training_project",
        "userdata",
    ]
    text = user_data_text(synth.launch_template())
    assert ".zip" in text and "PAYLOAD_URL=" in text


def test_outputs_name_every_node_the_bucket_and_the_parameter(synth: Synth) -> None:
    outputs = synth.template_dict["Outputs"]
    for rank in range(expected(synth)["nodes"]):
        assert f"Node{rank}InstanceId" in outputs
        assert "PrivateIp" in json.dumps(outputs[f"Node{rank}PrivateIp"])
        session = json.dumps(outputs[f"Node{rank}Session"])
        assert "aws ssm start-session --region " in session and " --target " in session
    # The bucket and the log group are the storage stack's outputs; this one names it.
    assert outputs["StorageStack"]["Value"] == "FabricStorage"
    assert outputs["MainAddressParameter"]["Value"] == "/fabric/FabricCluster/main-address"


def test_cdk_nag_has_no_unacknowledged_findings(synth: Synth) -> None:
    assert synth.violations("AwsSolutions") == []


def test_cfn_lint_is_clean(synth: Synth) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cfn-lint"),
            "--format",
            "parseable",
            str(synth.template_path),
            str(synth.storage_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_is_clean_and_every_skip_names_its_reason(synth: Synth) -> None:
    results = checkov(synth.template_path, synth.storage_path)["results"]
    assert [(c["check_id"], c["resource"]) for c in results["failed_checks"]] == []
    skipped = results.get("skipped_checks", [])
    assert {c["check_id"] for c in skipped} >= {"CKV_AWS_18", "CKV_AWS_111"}
    for check in skipped:  # the reason, as the template states it, reaches checkov
        assert len(check["check_result"].get("suppress_comment") or "") > 20, check


def test_artifacts_bucket_keeps_versions_for_a_bounded_time(synth: Synth) -> None:
    ((_, bucket),) = synth.resources("AWS::S3::Bucket", synth.storage_dict).items()
    props = bucket["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    (rule,) = props["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": NONCURRENT_VERSION_DAYS}
    assert synth.storage_dict["Outputs"].keys() >= {"ArtifactsBucket", "LogGroup"}
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert bucket["DeletionPolicy"] == "Retain"


def test_boot_script_passes_shellcheck(synth: Synth, tmp_path: Path) -> None:
    script = tmp_path / "user-data.sh"
    script.write_text(user_data_text(synth.launch_template()))
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_boot_script_runs_the_agent_with_the_stack_settings(synth: Synth) -> None:
    text = user_data_text(synth.launch_template(), placeholder="TOKEN")
    settings = "\n".join(
        line for line in text.splitlines() if line.startswith(("readonly ", "SCRIPT_ARGS="))
    )
    names = [
        "STACK_NAME",
        "ACCELERATOR",
        "DEVICES_PER_NODE",
        "MAIN_PORT",
        "SCRIPT",
        "MAIN_ADDRESS_PARAMETER",
        "PHASE_PARAMETER",
        "STOP_WHEN_DONE",
        "TORCH_VERSION",
        "PRECISION",
        "EFA",
    ]
    shown = subprocess.run(
        [
            "bash",
            "-c",
            settings + '\nfor v in "$@"; do printf "%s=%s\\n" "$v" "${!v}"; done;'
            ' for a in "${SCRIPT_ARGS[@]}"; do printf "ARG=%s\\n" "$a"; done',
            "bash",
            *names,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    values = dict(line.split("=", 1) for line in shown if not line.startswith("ARG="))
    args = [line[4:] for line in shown if line.startswith("ARG=")]
    want = RENDERED[synth.case]  # type: ignore[attr-defined]
    for key in ("ACCELERATOR", "DEVICES_PER_NODE", "MAIN_PORT", "STOP_WHEN_DONE", "PRECISION"):
        assert values[key] == want[key]
    assert values["EFA"] == "false"
    assert args == want["ARGS"]
    assert values["STACK_NAME"] == "FabricCluster"
    assert values["SCRIPT"] == "train.py"
    assert values["MAIN_ADDRESS_PARAMETER"] == "/fabric/FabricCluster/main-address"
    assert values["PHASE_PARAMETER"] == "/fabric/FabricCluster/node-{rank}/phase"
    assert values["TORCH_VERSION"] == "2.13.0"
    # The agent's command line is built from exactly these settings.
    for option, variable in (
        ("--main-address-parameter", "MAIN_ADDRESS_PARAMETER"),
        ("--phase-parameter", "PHASE_PARAMETER"),
        ("--accelerator", "ACCELERATOR"),
        ("--devices-per-node", "DEVICES_PER_NODE"),
        ("--max-restarts", "MAX_RESTARTS"),
        ("--main-port", "MAIN_PORT"),
        ("--precision", "PRECISION"),
    ):
        assert f'{option} "${variable}"' in text
    assert '"$SCRIPT" -- "${SCRIPT_ARGS[@]}")' in text
    assert "python -m userdata.agent" in text.replace('"$VENV/bin/python" -m', "python -m")


SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # an access key id
    r"(?i)aws_secret_access_key|secretaccesskey|aws_session_token",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)password\s*[=:]",
]


def test_no_secret_in_the_template_or_the_user_data(synth: Synth) -> None:
    import re

    texts = {
        "template": json.dumps(synth.template_dict),
        "user data": user_data_text(synth.launch_template()),
    }
    for where, text in texts.items():
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), f"{pattern} found in the {where}"


# Actions AWS grants only on "*": Session Manager's channel and instance-information actions.
STAR_ONLY_ACTIONS = frozenset(SESSION_MANAGER_ACTIONS)


def test_every_iam_statement_names_its_resources(synth: Synth) -> None:
    for statement in _policy_statements(synth):
        if "*" in statement["Resource"]:
            assert set(statement["Action"]) <= STAR_ONLY_ACTIONS, statement


def test_outputs_say_what_is_still_billed(synth: Synth) -> None:
    text = synth.template_dict["Outputs"]["StillBilled"]["Value"]
    nodes = expected(synth)["nodes"]
    volume = 150 if synth.case == "gpu4" else 50  # type: ignore[attr-defined]
    assert f"stopped nodes bill only their volumes ({nodes} x {volume} GB gp3)" in text
    assert "max_hours=12" in text and "make destroy removes this cluster" in text


def test_boot_script_schedules_the_max_hours_power_off(synth: Synth) -> None:
    text = user_data_text(synth.launch_template())
    assert "readonly MAX_HOURS=12\n" in text
    assert "shutdown -P +%d %q" in text and '"$((MAX_HOURS * 60))"' in text
    assert "if [[ ${FABRIC_POWEROFF:-} == allowed ]]; then" in text

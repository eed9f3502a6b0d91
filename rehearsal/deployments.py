"""A rehearsal's emulated AWS, namespaces and node processes, and each deployment on them:
synth, deploy, boot and wait; destroy and check what remains; close, also on failure."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rehearsal.boots import boot_nodes, create_network, notice_once_training, wait_for_boots
from rehearsal.emulated_aws import (
    EmulatedAws,
    EmulatedInstance,
    bootstrap_and_upload,
    deploy,
    destroy,
    ensure_stack,
    remaining,
    stack_groups,
    stack_instances,
)
from rehearsal.namespaces import EmulatedNetwork
from rehearsal.processes import NodeProcesses, stop_strays
from rehearsal.replacements import NodeLoss
from rehearsal.report import Manifest, Phases, RehearsalError, log
from stacks.cluster_app import STORAGE_STACK_ID, build_app, cdk_json_context, synthesize
from stacks.cluster_stack import VPC_CIDR

SUBNET_PREFIX_LENGTH = 24


def synth(folder: Path, args: argparse.Namespace, **overrides: str) -> tuple[Path, str, Any]:
    project = {"project": args.project, "script": args.script} if args.project else {}
    settings = {
        "num_nodes": args.num_nodes,
        "devices_per_node": args.devices_per_node,
        "script_args": shlex.join(args.script_args),
        **({"recover": True} if args.recover else {}),
        **(
            {"max_replacements": args.max_replacements}
            if getattr(args, "max_replacements", None) is not None
            else {}
        ),
        **project,
    }
    context = cdk_json_context(**(settings | overrides))
    app, stack = build_app(context, outdir=str(folder / "cdk.out"))
    synthesize(app, stack)
    return folder / "cdk.out", stack.artifact_id, stack.config


@dataclass
class Deployment:
    """One `cdk deploy` on the emulated AWS and the boot of its nodes."""

    folder: Path  # the nodes' homes and their console logs
    config: Any
    outputs: dict[str, str]
    nodes: list[EmulatedInstance]


class Rehearsal:
    """The emulated AWS, the namespaces and the node processes of one rehearsal."""

    def __init__(
        self,
        args: argparse.Namespace,
        folder: Path,
        phases: Phases,
        run_id: str,
        manifest: Manifest,
    ) -> None:
        self.args, self.folder, self.phases, self.run_id = args, folder, phases, run_id
        self.manifest = manifest
        self.aws = EmulatedAws(args.throttle)
        manifest.update(socket_folder=str(self.aws.socket_folder))
        self.aws.start()
        # From the run's id: two runs at once never share a name; short, as interface names are.
        self.network = EmulatedNetwork(f"fr{run_id[:6]}", SUBNET_PREFIX_LENGTH)
        self.processes = NodeProcesses()
        self.installs: dict[str, str] = {}
        self.deploys = 0
        self.ended: list[float] = []  # when each node's user data ended, last deploy
        self.loss: NodeLoss | None = None  # the last deploy's lost node, if it lost one

    def deploy(
        self,
        what: str,
        spot_node: int | None = None,
        lose_node: int | None = None,
        **overrides: str,
    ) -> Deployment:
        """Synth with these settings, deploy, boot every node and wait for them to end;
        spot_node gets a spot notice once node 0 has trained its first step; lose_node
        (recover) is lost without notice once the run has a checkpoint, and its group's
        replacement boots."""
        self.deploys += 1
        folder = self.folder / f"deploy-{self.deploys}"
        folder.mkdir()
        log(f"deploy {self.deploys}: {what}")
        phases, aws = self.phases, self.aws
        assembly, artifact, config = phases.run(
            "synth the app", lambda: synth(folder, self.args, **overrides)
        )
        count = phases.run(
            "bootstrap, upload assets", lambda: bootstrap_and_upload(aws, assembly, artifact)
        )
        log(f"{count} asset(s) uploaded to the emulated S3 at {aws.url}")
        created, storage = phases.run(
            "the storage stack",
            lambda: ensure_stack(
                aws, assembly / f"{STORAGE_STACK_ID}.template.json", config.storage_stack
            ),
        )
        log(
            f"storage stack {config.storage_stack} {'created' if created else 'kept as it is'}: "
            f"s3://{storage['ArtifactsBucket']}, log group {storage['LogGroup']}"
        )
        cluster = phases.run(
            "create the stack",
            lambda: deploy(aws, assembly / f"{artifact}.template.json", config.stack_name),
        )
        outputs = {**storage, **cluster}  # what the console merges the same way
        nodes = stack_instances(aws, config.stack_name)
        if len(nodes) != config.num_nodes:
            raise RehearsalError(f"{len(nodes)} node(s) run, not {config.num_nodes}: {nodes}")
        if config.recover:  # node 0 publishes its address at boot
            groups = [g["AutoScalingGroupName"] for g in stack_groups(aws, config.stack_name)]
            log(f"CREATE_COMPLETE; a group of one instance per rank: {', '.join(groups)}")
        else:
            address = check_main_address(aws, config, nodes[0])
            log(f"CREATE_COMPLETE; {config.main_address_parameter} = node 0's {address}")
        log(f"run {outputs['RunName']} in s3://{outputs['ArtifactsBucket']}/{config.stack_name}/")
        phases.run(
            "create the namespaces",
            lambda: create_network(
                self.network, [node.private_ip for node in nodes], self.manifest
            ),
        )
        boots = phases.run(
            "start stubs, boot the nodes",
            lambda: boot_nodes(
                folder,
                aws,
                self.network,
                nodes,
                self.processes,
                self.run_id,
                self.installs,
                self.folder,
                self.args.main_node_delay if self.deploys == 1 else 0.0,
                self.args.fail_node,
            ),
        )
        on_tick: Callable[[], None] | None = None
        if spot_node is not None:
            on_tick = notice_once_training(folder, spot_node)
        if spot_node is not None and config.recover:  # it gives way; its replacement boots
            lose_node = spot_node
        if lose_node is not None:

            def boot(new: list[EmulatedInstance], slots: dict[int, int]) -> list[Any]:
                return boot_nodes(
                    folder, aws, self.network, new, self.processes, self.run_id,
                    self.installs, self.folder, slots=slots,
                )  # fmt: skip

            notice = on_tick
            self.loss = NodeLoss(
                rank=lose_node, aws=aws, network=self.network, processes=self.processes,
                folder=folder, config=config, nodes=nodes, boots=boots, boot=boot,
                lose=notice is None,
            )  # fmt: skip
            loss = self.loss

            def on_tick() -> None:
                if notice:
                    notice()
                loss()

        self.ended = phases.run(
            "train (boot to done)",
            lambda: wait_for_boots(boots, self.args.timeout, self.expect_failure, on_tick),
        )
        log(f"the nodes met an AWS that throttles: {aws.node_throttle.describe()}")
        return Deployment(folder, config, outputs, nodes)

    def destroy(self, deployment: Deployment) -> None:
        """`make destroy` (the cluster stack only), and a check that only the storage stack's
        artifacts bucket (and logs) remain of it."""
        self.processes.stop_all()
        config, outputs = deployment.config, deployment.outputs
        notes = self.phases.run(
            "destroy the stack", lambda: destroy(self.aws, config.stack_name, VPC_CIDR)
        )
        for note in notes:
            log(note)
        failures = self.network.delete()
        if failures:
            raise RehearsalError(f"namespaces left after deploy {self.deploys}: {failures}")
        left = remaining(self.aws, config.stack_name, VPC_CIDR, outputs["ArtifactsBucket"])
        gone = {kind: names for kind, names in left.items() if kind != "buckets" and names}
        if gone or left["buckets"] != [outputs["ArtifactsBucket"]]:
            raise RehearsalError(f"after destroy, expected only the artifacts bucket: {left}")
        log(f"after destroy only the artifacts bucket remains: {left['buckets'][0]}")

    @property
    def expect_failure(self) -> bool:
        """A scenario whose nodes must fail (a broken install, a run that gives up)."""
        return self.args.fail_node is not None or self.args.max_replacements == 0

    def close(self) -> None:
        self.processes.stop_all()
        failures = stop_strays(self.run_id, self.network)
        failures += self.network.delete()
        self.aws.stop()
        for failure in failures:
            log(f"cleanup: {failure}")


def check_main_address(aws: EmulatedAws, config: Any, node0: EmulatedInstance) -> str:
    """The main-address parameter holds node 0's private IP; returns it."""
    main = aws.client("ssm").get_parameter(Name=config.main_address_parameter)
    if main["Parameter"]["Value"] != node0.private_ip:
        raise RehearsalError(
            f"{config.main_address_parameter} is {main['Parameter']['Value']}, node 0 has "
            f"{node0.private_ip}"
        )
    return node0.private_ip


def agent_output(deployment: Deployment, rank: int) -> str:
    return (deployment.folder / f"node-{rank}" / "console.log").read_text()

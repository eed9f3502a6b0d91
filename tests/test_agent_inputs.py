"""The run's inputs through the node agent (moto and an IMDSv2 stub on 127.0.0.1): the script
sees env, the secret and its data channel; the secret's value shows nowhere else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rehearsal.imds_stub import ImdsStub, node_values
from tests.conftest import moto_client
from tests.test_agent import StackParameters, main_port, run_agent
from userdata.masking import MASK
from userdata.run_inputs import DataChannel, RunInputs, SecretRef

SECRET = "hf_0123456789abcdefSECRET"
# One optimizer step (training started), then what a user's script does with its inputs; it
# prints the secret, as a careless script would, and fails with it in its error when asked.
SCRIPT = """\
import hashlib, json, os, pathlib, sys, torch
weight = torch.nn.Parameter(torch.zeros(1))
torch.optim.SGD([weight], lr=0.1).step()
data = pathlib.Path(os.environ["FABRIC_DATA_DIR"])
token = os.environ["HF_TOKEN"]
pathlib.Path(sys.argv[1]).write_text(json.dumps({
    "project": os.environ["WANDB_PROJECT"],
    "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
    "files": sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()),
}))
print("the token is", token, flush=True)
if sys.argv[2] == "fail":
    raise ValueError("rejected token " + token)
"""


def agent_args(parameters: StackParameters, tmp_path: Path, inputs: Path, *script: str) -> list:
    return [
        *parameters.agent_options,
        "--devices-per-node", "1", "--main-port", main_port(),
        "--run-dir", str(tmp_path / "run"), "--rendezvous-timeout", "30",
        "--max-restarts", "0", "--inputs", str(inputs), "--data-dir", str(tmp_path / "data"),
        *script,
    ]  # fmt: skip


@pytest.fixture
def inputs(moto_url: str, tmp_path: Path) -> Path:
    s3, ssm = moto_client(moto_url, "s3"), moto_client(moto_url, "ssm")
    bucket = f"inputs-{tmp_path.name.lower().replace('_', '-')}"[:60]
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="train/a.txt", Body=b"a")
    s3.put_object(Bucket=bucket, Key="train/b/c.txt", Body=b"c")
    name = f"/test/{tmp_path.name}/hf-token"
    ssm.put_parameter(Name=name, Value=SECRET, Type="SecureString")
    path = tmp_path / "inputs.json"
    path.write_text(
        RunInputs(
            data=(DataChannel("train", bucket, "train/"),),
            env={"WANDB_PROJECT": "demo"},
            secrets=(SecretRef("HF_TOKEN", "ssm", name),),
        ).to_json()
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_the_script_gets_env_the_secret_and_its_data_and_the_secret_shows_nowhere(
    aws_env, ssm, tmp_path: Path, inputs: Path, outcome: str
) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    seen = tmp_path / "seen.json"
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *agent_args(parameters, tmp_path, inputs, str(script), "--", str(seen), outcome),
            timeout=120,
        )
    output = result.stdout + result.stderr
    assert json.loads(seen.read_text()) == {
        "project": "demo",
        "token_sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
        "files": ["a.txt", "b/c.txt"],
    }
    assert f"the token is {MASK}" in output
    assert SECRET not in output
    phase = parameters.phase_of(ssm, 0)
    assert SECRET not in phase
    history = ssm.get_parameter_history(Name=parameters.phase(0))["Parameters"]
    assert not [p for p in history if SECRET in p["Value"]]
    stops = ssm.get_parameter_history(Name=parameters.stop)["Parameters"]  # the cluster's stop
    assert not [p for p in stops if SECRET in p["Value"]]
    if outcome == "ok":
        assert result.returncode == 0, output
        assert phase == "done"
        phases = [json.loads(p["Value"])["phase"] for p in history if p["Value"].startswith("{")]
        assert phases[:4] == [
            "reading-secrets",
            "waiting-for-main",
            "data: 0.0 of 0.0 GB",
            "data: 0.0 of 0.0 GB",
        ]
    else:
        assert result.returncode != 0
        assert (
            phase == f"failed: fabric run exited with status 1 (ValueError: rejected token {MASK})"
        )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            RunInputs(secrets=(SecretRef("HF_TOKEN", "ssm", "/test/absent"),)),
            "secret HF_TOKEN (parameter /test/absent): not found",
        ),
        (
            RunInputs(data=(DataChannel("train", "no-such-bucket", "x/"),)),
            "data channel train: cannot list s3://no-such-bucket/x/: the bucket does not exist",
        ),
    ],
    ids=["missing-secret", "unreadable-channel"],
)
def test_an_input_that_cannot_be_had_fails_the_node_before_training_in_one_line(
    aws_env, ssm, tmp_path: Path, inputs: RunInputs, message: str
) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")
    path = tmp_path / "inputs.json"
    path.write_text(inputs.to_json())
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env, imds, *agent_args(parameters, tmp_path, path, "never-run.py"), timeout=60
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"error: {message}" in result.stderr
    assert parameters.phase_of(ssm, 0) == f"failed: {message}"
    assert parameters.stop_value(ssm).reason == message  # the cluster stops with it
    assert "running: fabric run" not in result.stdout

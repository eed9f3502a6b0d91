"""Secrets on a node: read from Parameter Store and Secrets Manager (the emulated ones), a
missing one named in one line, and their values masked in what the node shows."""

from __future__ import annotations

import os
import threading

import pytest

from tests.conftest import REGION, moto_client
from userdata import secret_values
from userdata.errors import AgentError
from userdata.masking import MASK, Masker, pump
from userdata.phase import PhaseReporter
from userdata.run_inputs import SecretRef
from userdata.secret_values import read_secrets

VALUE = "wandb-0123456789abcdef"


@pytest.fixture
def secrets(moto_url: str, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    ssm, manager = moto_client(moto_url, "ssm"), moto_client(moto_url, "secretsmanager")
    ssm.put_parameter(Name="/team/wandb-key", Value=VALUE, Type="SecureString", Overwrite=True)
    arn = manager.create_secret(Name=f"prod/db-{os.getpid()}", SecretString="postgres://u:p@h/db")[
        "ARN"
    ]
    yield arn
    manager.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
    ssm.delete_parameter(Name="/team/wandb-key")


def test_both_kinds_are_read_decrypted(secrets: str) -> None:
    name = secrets.rsplit(":", 1)[1].rsplit("-", 1)[0]
    found = read_secrets(
        (
            SecretRef("WANDB_API_KEY", "ssm", "/team/wandb-key"),
            SecretRef("DB_URL", "secretsmanager", name),
            SecretRef("DB_URL_BY_ARN", "secretsmanager", secrets),
        ),
        REGION,
        5.0,
    )
    assert found == {
        "WANDB_API_KEY": VALUE,
        "DB_URL": "postgres://u:p@h/db",
        "DB_URL_BY_ARN": "postgres://u:p@h/db",
    }


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (
            SecretRef("HF_TOKEN", "ssm", "/team/missing"),
            "secret HF_TOKEN (parameter /team/missing): not found",
        ),
        (
            SecretRef("DB", "secretsmanager", "nope/db"),
            "secret DB (secret nope/db): not found",
        ),
    ],
)
def test_a_missing_secret_is_one_line_naming_it(
    secrets: str, secret: SecretRef, message: str
) -> None:
    with pytest.raises(AgentError) as error:
        read_secrets((SecretRef("WANDB_API_KEY", "ssm", "/team/wandb-key"), secret), REGION, 5.0)
    assert str(error.value) == message


def pumped(masker: Masker, *pieces: bytes) -> bytes:
    """What pump passes on when a child writes these pieces, one write each."""
    child_read, child_write = os.pipe()
    sink_read, sink_write = os.pipe()
    out: list[bytes] = []
    with os.fdopen(sink_read, "rb") as sink:
        reader = threading.Thread(target=lambda: out.append(sink.read()))
        reader.start()
        with os.fdopen(child_read, "rb", buffering=0) as source:
            thread = threading.Thread(target=pump, args=(source, sink_write, masker))
            thread.start()
            for piece in pieces:
                os.write(child_write, piece)
            os.close(child_write)
            thread.join(10)
        os.close(sink_write)
        reader.join(10)
    return out[0]


def test_a_value_split_across_writes_and_lines_is_still_masked() -> None:
    masker = Masker([VALUE, "-----BEGIN KEY-----\nline-two-of-the-key\n-----END KEY-----"])
    out = pumped(
        masker,
        b"key is wandb-0123",
        b"456789abcdef, done\r",
        b"progress 50%\rline-two-of-the-key\n",
        b"no newline at the end: " + VALUE.encode(),
    )
    assert VALUE.encode() not in out and b"line-two-of-the-key" not in out
    assert out == (
        f"key is {MASK}, done\rprogress 50%\r{MASK}\nno newline at the end: {MASK}".encode()
    )


def test_a_long_line_without_an_end_goes_out_in_pieces_without_showing_a_value() -> None:
    masker = Masker([VALUE])
    filler = b"x" * (70 * 1024 - 5)
    out = pumped(masker, filler + VALUE.encode()[:10], VALUE.encode()[10:] + b" end\n")
    assert out == filler + f"{MASK} end\n".encode()


def test_short_values_are_not_masked_and_nothing_is_without_secrets() -> None:
    assert Masker(["abc"]).mask("abc abc") == "abc abc"
    assert not Masker()


def test_a_phase_never_holds_a_value(capsys: pytest.CaptureFixture[str]) -> None:
    reporter = PhaseReporter(None, None)
    reporter.masker.add([VALUE])
    reporter.record(f"failed: script: ValueError: bad token {VALUE}")
    assert (
        capsys.readouterr().out
        == f"[fabric-agent] phase: failed: script: ValueError: bad token {MASK}\n"
    )


def test_escaped_encoded_and_json_field_forms_are_masked_too() -> None:
    secret = '{"username": "svc-user", "password": "p@ss w\\"ord/1"}'
    masker = Masker([secret])
    printed = [
        'password p@ss w"ord/1',  # one field of the JSON secret
        "repr 'p@ss w\"ord/1'",
        'json "p@ss w\\"ord/1"',
        "url postgres://svc-user:p%40ss%20w%22ord%2F1@db/x",
        "form p%40ss+w%22ord%2F1",
    ]
    for line in printed:
        assert "p@ss" not in masker.mask(line) and "p%40ss" not in masker.mask(line), line
    assert masker.mask("user svc-user") == f"user {MASK}"


def test_a_sink_that_is_gone_does_not_block_the_child() -> None:
    child_read, child_write = os.pipe()
    sink_read, sink_write = os.pipe()
    os.close(sink_read)  # nobody reads: every write fails (EPIPE)
    with os.fdopen(child_read, "rb", buffering=0) as source:
        thread = threading.Thread(target=pump, args=(source, sink_write, Masker([VALUE])))
        thread.start()
        for _ in range(64):  # far more than a pipe holds: the pump must keep draining
            os.write(child_write, b"x" * 4096 + b"\n")
        os.close(child_write)
        thread.join(10)
        assert not thread.is_alive()
    os.close(sink_write)


def test_parameters_are_read_ten_at_a_time(
    moto_url: str, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 nodes read their secrets at once from an account-wide quota: one GetParameters per
    ten, not one call per secret."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    ssm = moto_client(moto_url, "ssm")
    names = [f"/batch-{os.getpid()}/key-{index}" for index in range(12)]
    for index, name in enumerate(names):
        ssm.put_parameter(Name=name, Value=f"value-{index:04d}", Type="SecureString")
    calls: list[str] = []
    real = secret_values.aws_client

    def counted(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register("before-call.*.*", lambda model, **_: calls.append(model.name))
        return client

    monkeypatch.setattr(secret_values, "aws_client", counted)
    refs = tuple(SecretRef(f"KEY_{index}", "ssm", name) for index, name in enumerate(names))
    try:
        found = read_secrets(refs, REGION, 5.0)
    finally:
        ssm.delete_parameters(Names=names[:10])
        ssm.delete_parameters(Names=names[10:])
    assert found == {f"KEY_{index}": f"value-{index:04d}" for index in range(12)}
    assert calls == ["GetParameters", "GetParameters"]

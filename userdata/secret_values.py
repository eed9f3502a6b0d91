"""The secrets' values, read by the node at each start of its agent with its role (exactly
those ARNs), handed to the script's environment only: never printed, never recorded."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from userdata.aws_clients import aws_client
from userdata.errors import AgentError
from userdata.run_inputs import SecretRef

NOT_FOUND = {"ParameterNotFound", "ResourceNotFoundException", "ParameterVersionNotFound"}
DENIED = {"AccessDeniedException", "AccessDenied", "KMSAccessDeniedException"}


def _value(client, secret: SecretRef) -> str:
    if secret.service == "ssm":
        return client.get_parameter(Name=secret.name, WithDecryption=True)["Parameter"]["Value"]
    answer = client.get_secret_value(SecretId=secret.name)
    if "SecretString" in answer:
        return answer["SecretString"]
    try:
        return answer["SecretBinary"].decode()
    except UnicodeDecodeError:
        raise AgentError(
            f"secret {secret.describe()}: binary, not text (an environment variable holds text)"
        ) from None


def _why(error: ClientError | BotoCoreError) -> str:
    """The error's code, never its message's text beyond AWS's own (it holds no value)."""
    if not isinstance(error, ClientError):
        return str(error)
    code = error.response.get("Error", {}).get("Code", "")
    if code in NOT_FOUND:
        return "not found"
    if code in DENIED:
        return (
            "access denied (the node role reads exactly the named ones; a customer-managed KMS "
            "key must allow the role)"
        )
    return code or str(error)


def read_secrets(secrets: tuple[SecretRef, ...], region: str, timeout: float) -> dict[str, str]:
    """{variable: value}; the first that cannot be read is one line naming it."""
    values = {}
    for secret in secrets:
        parts = secret.arn_parts
        client = aws_client(secret.service, parts[1] if parts else region, timeout)
        try:
            values[secret.variable] = _value(client, secret)
        except (ClientError, BotoCoreError) as error:
            raise AgentError(f"secret {secret.describe()}: {_why(error)}") from None
    return values

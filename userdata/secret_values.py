"""The secrets' values, read by the node at each start of its agent with its role (exactly
those ARNs), handed to the script's environment only: never printed, never recorded."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from userdata.aws_clients import aws_client
from userdata.errors import AgentError
from userdata.run_inputs import SecretRef

NOT_FOUND = {"ParameterNotFound", "ResourceNotFoundException", "ParameterVersionNotFound"}
DENIED = {"AccessDeniedException", "AccessDenied", "KMSAccessDeniedException"}
PARAMETERS_PER_CALL = 10  # GetParameters' limit


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


def _parameters(client, batch: list[SecretRef]) -> dict[str, str]:
    """Up to 10 parameters in one GetParameters (Parameter Store's throughput is the
    account's: 64 nodes reading at once); a refused batch is read one by one, to name the
    one that is refused."""
    try:
        answer = client.get_parameters(Names=[secret.name for secret in batch], WithDecryption=True)
    except ClientError:
        return {secret.variable: _read_one(client, secret) for secret in batch}
    found = {}
    for parameter in answer["Parameters"]:
        found[parameter["Name"]] = found[parameter.get("ARN", "")] = parameter["Value"]
    values = {}
    for secret in batch:
        if secret.name not in found:
            raise AgentError(f"secret {secret.describe()}: not found")
        values[secret.variable] = found[secret.name]
    return values


def _read_one(client, secret: SecretRef) -> str:
    try:
        return _value(client, secret)
    except (ClientError, BotoCoreError) as error:
        raise AgentError(f"secret {secret.describe()}: {_why(error)}") from None


def read_secrets(secrets: tuple[SecretRef, ...], region: str, timeout: float) -> dict[str, str]:
    """{variable: value}, in the order given; the first that cannot be read is one line
    naming it. One client per service and region."""
    clients: dict[tuple[str, str], object] = {}
    groups: dict[tuple[str, str], list[SecretRef]] = {}
    for secret in secrets:
        parts = secret.arn_parts
        place = (secret.service, parts[1] if parts else region)
        groups.setdefault(place, []).append(secret)
        if place not in clients:
            clients[place] = aws_client(place[0], place[1], timeout)
    values: dict[str, str] = {}
    for place, group in groups.items():
        client = clients[place]
        try:
            if place[0] == "ssm":
                for start in range(0, len(group), PARAMETERS_PER_CALL):
                    values |= _parameters(client, group[start : start + PARAMETERS_PER_CALL])
            else:
                values |= {secret.variable: _read_one(client, secret) for secret in group}
        except BotoCoreError as error:
            raise AgentError(f"secrets: cannot reach {place[0]} in {place[1]}: {error}") from None
    return {secret.variable: values[secret.variable] for secret in secrets}

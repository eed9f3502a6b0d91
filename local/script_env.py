"""The script's own variables on the local cluster, as `env` and `secrets` give them on EC2:
--env-file (a .env file: KEY=VALUE lines, # comments, quotes, `export `; python-dotenv's rules),
then --env KEY=VALUE (which wins), and --data DIR as $FABRIC_DATA_DIR. The names follow the
cluster's rules (userdata/run_inputs.py): none that the agent or fabric run sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from dotenv import dotenv_values

from userdata.run_inputs import DATA_DIR_ENV, InputError, variable_name


def env_file(path: str) -> dict[str, str]:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--env-file {path}: no such file")
    values = dotenv_values(file)
    for name, value in values.items():
        try:
            variable_name(name)
        except InputError as error:
            raise InputError(f"--env-file {path}: {error}") from None
        if value is None:
            raise InputError(f"--env-file {path}: {name} has no value (NAME=VALUE)")
    return {name: value for name, value in values.items() if value is not None}


def env_option(item: str) -> tuple[str, str]:
    name, equals, value = item.partition("=")
    if not equals:
        raise InputError(f"--env {item!r}: expected KEY=VALUE")
    try:
        return variable_name(name.strip()), value
    except InputError as error:
        raise InputError(f"--env {item!r}: {error}") from None


def script_environment(args: argparse.Namespace) -> dict[str, str]:
    """Raises InputError, one line naming the option."""
    given = env_file(args.env_file) if args.env_file else {}
    given.update(env_option(item) for item in args.env)
    if args.data:
        folder = Path(args.data).resolve()
        if not folder.is_dir():
            raise InputError(f"--data {args.data}: no such folder")
        given[DATA_DIR_ENV] = str(folder)
    return given

"""Stand-in wheels for the install tests: tiny pure-Python wheels written with zipfile, so that
a test can hold a "PyTorch index" (a find-links folder) and a "PyPI" of its own, e.g. a CPU and
a "CUDA" torchvision where this machine has no torchvision at all."""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(
    folder: Path,
    name: str,
    version: str,
    files: Mapping[str, str | bytes],
    requires: Sequence[str] = (),
) -> Path:
    """A py3-none-any wheel of `name` `version` holding `files` (path in the wheel: content),
    with a RECORD that lists every file (what the install check reads)."""
    escaped = re.sub(r"[-_.]+", "_", name).lower()  # the wheel file name's form of the name
    info = f"{escaped}-{version}.dist-info"
    metadata = "".join(
        [
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            *(f"Requires-Dist: {requirement}\n" for requirement in requires),
        ]
    )
    wheel = "Wheel-Version: 1.0\nGenerator: tests.wheels\nRoot-Is-Purelib: true\n"
    wheel += "Tag: py3-none-any\n"
    contents = {
        path: data.encode() if isinstance(data, str) else data
        for path, data in {**files, f"{info}/METADATA": metadata, f"{info}/WHEEL": wheel}.items()
    }
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in contents.items()]
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{escaped}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path

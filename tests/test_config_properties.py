"""Property tests: whatever a cdk.json key holds, the settings load or fail with one line naming
the key. Nothing else (no traceback, no other exception type)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from stacks.config import SETTINGS, ConfigError, load_config
from tests.cfn import cdk_json_context

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
# What -c key=value can carry: any string, including numbers, CIDRs and paths in disguise.
CLI_STRINGS = (
    st.text()
    | st.from_regex(r"-?\d{1,20}", fullmatch=True)
    | st.sampled_from(
        [
            "0.0.0.0/0",
            "10.0.0.0/33",
            "trainer/../../etc/passwd",
            "true",
            "FALSE",
            "gpu",
            "g5.xlarge",
            "t2.large",
            "",
            " ",
            "nan",
            "1e3",
            "0x10",
            "\uff11\uff12",
        ]  # fullwidth digits
    )
)


def check(key: str, value: Any) -> None:
    try:
        load_config(cdk_json_context(**{key: value}).get)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(("invalid setting ", "missing setting ")), message
        assert key in message, message  # accelerator=gpu with a CPU type names both keys
        assert len(message.splitlines()) == 1


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(SETTINGS), value=JSON_VALUES | CLI_STRINGS)
@example(key="script", value="trainer/\x00train.py")  # a NUL byte once raised ValueError
@example(key="stack_name", value="a\u2028b")
@example(key="num_nodes", value=float("inf"))
@example(key="script_args", value=["--a", 1])
def test_any_value_loads_or_fails_with_one_line_naming_the_key(key: str, value: Any) -> None:
    check(key, value)

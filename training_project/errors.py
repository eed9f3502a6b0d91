"""A project that cannot be used, as one line. No imports: the node's install step raises
DependencyError in a venv that holds nothing yet (see dependencies.py)."""


class ProjectError(ValueError):
    """A bad project or script setting; the message is the one line a user sees."""


class DependencyError(ValueError):
    """A dependency file that cannot be used; the message is one line."""


def invalid(key: str, value: object, problem: str) -> ProjectError:
    return ProjectError(f"invalid setting {key}={value!r}: {problem}")

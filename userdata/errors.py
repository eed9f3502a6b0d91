"""The node agent's one kind of expected failure."""


class AgentError(Exception):
    """A failure the agent reports as one line (and as the node's phase) before exiting."""

"""The CDK side of the project: settings, the cluster stack and its constructs."""

import os

# jsii prints a 12-line banner on every run under Node 20 (still what this machine has); it
# would bury the one-line setting errors. Users on a newer Node never see it anyway.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

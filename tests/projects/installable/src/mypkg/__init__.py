"""A package that a node installs, in the src layout."""

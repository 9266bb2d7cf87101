"""The ``evhub`` command: the one place that turns errors into one-line messages and exit codes."""

"""The agent side: waits on the reinit endpoint and acts on each claim. It shares only
reinitd.wire with the server, and installs without the server's dependencies."""

# Exit codes of `reinitd agent`, documented in the README and its --help.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_WAITING = 3  # 409: the workspace is not, or no longer, a prebuild waiting to be claimed
EXIT_COMMAND_FAILED = 4  # the command failed on every attempt

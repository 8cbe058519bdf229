"""Constants shared by server, client and tools: exit codes, transfer sizes, defaults."""
from __future__ import annotations

# Exit codes of the console scripts.
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error
EXIT_USAGE = 2  # bad flags, bad recipe, bad data: the message says what to fix
EXIT_REFUSED = 3  # the coordinator refused this client (shape mismatch, bad token, ...)
EXIT_UNAVAILABLE = 4  # the coordinator could not be reached within the retry budget
EXIT_STOPPED = 5  # a client stopped by SIGTERM/SIGINT before the run was DONE

# Blob transfer: chunks of 1-4 MiB keep every gRPC message far below its limits.
CHUNK_BYTES = 2 * 1024 * 1024
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

DEFAULT_PORT = 50051
PROTOCOL_VERSION = 1

# Long-poll: how long PollTask may hold a request before answering WAIT.
POLL_HOLD_S = 10.0
# Retry policy of clients when the coordinator is briefly away.
RECONNECT_BASE_S = 0.5
RECONNECT_MAX_S = 10.0
RECONNECT_BUDGET_S = 300.0

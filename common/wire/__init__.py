"""Generated gRPC stubs of proto/fedcmp/v1 (regenerate with `make proto`; never edit by hand)."""

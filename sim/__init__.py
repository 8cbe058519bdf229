"""In-process federations for research sweeps: the client trainer and the server strategies, no gRPC."""

"""The fedcmp coordinator: gRPC service, round state machine, durable run store, aggregation strategies,
status and Prometheus metrics (`fedcmp-server`, `fedcmp-status`)."""

"""The fedcmp client daemon: LLaVA-format data, the frozen-backbone MLLM around a trainable projector,
the local trainer, backbone fingerprints and the loop that talks to the coordinator (`fedcmp-client`)."""

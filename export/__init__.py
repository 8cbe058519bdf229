"""fedcmp-export: a trained projector as LLaVA's `mm_projector` files and as a transformers Llava directory.

Reads what the coordinator's store wrote (a state dir, or one projector .safetensors) and
depends only on `fedcmp.common` and the client's model composition, never on the server.
`export_projector` is the Python entry point; `fedcmp-export` the command.
"""

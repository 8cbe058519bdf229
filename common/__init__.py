"""Shared pieces of fedcmp: recipe, projector layout, blob codec, wire stubs, micro zoo, data."""

"""A Flower App of no-op clients: each downloads the global projector, adds noise, sends it back."""

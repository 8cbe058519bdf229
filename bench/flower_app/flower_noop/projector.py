"""The LLaVA projector's tensors as NumPy arrays (the Flower side does not import fedcmp or torch)."""
from __future__ import annotations

import numpy as np

NOISE_SCALE = 1e-3  # as bench/noop_client.py


def projector_arrays(projector_type: str, vision_hidden: int, text_hidden: int, seed: int = 0) -> list[np.ndarray]:
    """linear_1.weight [text, vision], linear_1.bias [text] (+ linear_2 [text, text], [text]), float32."""
    shapes = [(text_hidden, vision_hidden), (text_hidden,)]
    if projector_type == "mlp2x_gelu":
        shapes += [(text_hidden, text_hidden), (text_hidden,)]
    rng = np.random.default_rng(seed)
    return [0.02 * rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def add_noise(arrays: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """arrays + N(0, NOISE_SCALE^2) per value."""
    rng = np.random.default_rng(seed)
    return [array + NOISE_SCALE * rng.standard_normal(array.shape, dtype=np.float32) for array in arrays]

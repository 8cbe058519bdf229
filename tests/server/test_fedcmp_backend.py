"""Fed-CMP's GEMM backend: oneDNN where PyTorch has it, `a @ b.T` otherwise, with equal results."""
from __future__ import annotations

import pytest
import torch

from fedcmp.server.strategies import ClientUpdate, build_strategy
from fedcmp.server.strategies import fedcmp

# m = 48 > 2 (r_max + oversample) = 12: the range sketch runs, so every product goes through the backend.
TALL = {"linear_1.weight": (48, 10), "linear_1.bias": (48,), "linear_2.weight": (48, 48), "linear_2.bias": (48,)}


def round_of(clients: int, seed: int) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen) for key, shape in TALL.items()}
    updates = [ClientUpdate(f"c{k}", 10 + k, {key: value + 0.1 * torch.randn(value.shape, generator=gen)
                                              for key, value in base.items()}, {})
               for k in range(clients)]
    return base, updates


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (False, True), (True, False), (True, True)])
def test_times_transposed_is_a_times_b_transposed(transpose_a: bool, transpose_b: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=gen)
    b = torch.randn(5, 33, generator=gen)
    a_in = a.T.contiguous().T if transpose_a else a  # the same values as a strided view
    b_in = b.T.contiguous().T if transpose_b else b
    torch.testing.assert_close(fedcmp.times_transposed(a_in, b_in), a @ b.T, rtol=1e-5, atol=1e-5)


def test_fedcmp_results_do_not_depend_on_the_gemm_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"r_max": 4, "oversample": 2}
    first, second = round_of(5, seed=1), round_of(5, seed=2)
    backend = build_strategy("fedcmp", params)
    with_backend = [backend.aggregate(*first), backend.aggregate(*second)]
    monkeypatch.setattr(fedcmp, "_ONEDNN_LINEAR", None)
    plain = build_strategy("fedcmp", params)
    without = [plain.aggregate(*first), plain.aggregate(*second)]
    for got, expected in zip(with_backend, without):
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)

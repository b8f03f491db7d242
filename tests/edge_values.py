"""Edge-value inputs shared by the backend agreement tests: every pair of special or extreme fp32 values."""

from __future__ import annotations

import torch

from minigpt.ops import reference

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1e-30, float("nan"), float("inf"), float("-inf"), 3e38, -3e38,
           100.0, -100.0, 88.8, -88.8, 30.0, -30.0, 6.0, -6.0, -8.0, -10.0, -17.0, -16.0, 1.0, -1.0, 0.5, -0.5]


def edge_grids(dtype: torch.dtype, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gate, up) pairs in ``dtype``: finite gates by row (every SPECIAL finite value, every activation's
    ``active_min`` and its fp32 neighbours, [-30, 30] by 1/8) against every SPECIAL up by column; then every SPECIAL
    gate (NaN and ±inf included) by column against those values as up by row, so a NaN poisons only its column.
    The columns come three times, rotated by 0, 1 and 2 (84 columns): every value in even and odd columns, in full
    32- and 16-column vectors and a partial one."""
    lows = [reference.active_min(a) for a in reference.ACTIVATIONS if a != "identity"]
    around = [torch.nextafter(torch.tensor(lo), torch.tensor(d)).item() for lo in lows for d in (-1e9, 1e9)]
    special = torch.tensor(SPECIAL)
    finite = torch.cat([special[special.isfinite()], torch.tensor(lows + around), torch.arange(-240, 241) / 8])
    pairs = [(finite[:, None].expand(-1, len(special)), special[None, :].expand(len(finite), -1)),
             (special[None, :].expand(len(finite), -1), finite[:, None].expand(-1, len(special)))]
    def widen(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.roll(k, dims=1) for k in range(3)], dim=1)

    return [(widen(g).to(device, dtype), widen(u).to(device, dtype)) for g, u in pairs]


# |act(x)| differences below this are fp32 exp range artefacts (0 vs a subnormal near x = -88), allowed everywhere
ACT_ATOL = 1e-30


def assert_same_stats(ours: tuple, ref: tuple, up: torch.Tensor | None, exact_values: bool, nan_exact: bool) -> None:
    """ours, ref: (h, acc, nnz) from ``up`` (or None). Counts and the finite/non-finite pattern of everything equal,
    and which values are NaN when ``nan_exact`` (an infinite up times an activation that one backend rounds to 0 and
    another to a subnormal is NaN or ±inf: non-finite either way); h and max|h| equal if ``exact_values``, else (and
    the sums, whose order differs) within fp32 rounding plus ``ACT_ATOL`` times |up|."""
    (h, acc, nnz), (h_ref, acc_ref, nnz_ref) = ours, ref
    assert torch.equal(nnz, nnz_ref), (nnz - nnz_ref).nonzero().flatten().tolist()
    scale = torch.ones(h_ref.shape) if up is None else up.float().abs()
    rtol = max(1e-5, torch.finfo(h_ref.dtype).eps)
    col_atol = ACT_ATOL * scale.sum(0) * (1 + h_ref.float().abs().nan_to_num(0, 0, 0).amax(0))
    checks = ((h, h_ref, ACT_ATOL * scale, "h", exact_values), (acc[:2], acc_ref[:2], col_atol, "sums", False),
              (acc[2], acc_ref[2], col_atol, "max", exact_values))
    for x, y, atol, what, exact in checks:
        x, y = x.float(), y.float()
        assert torch.equal(x.isfinite(), y.isfinite()), f"{what}: non-finite at different places"
        if nan_exact:
            assert torch.equal(x.isnan(), y.isnan()), f"{what}: NaN at different places"
        finite = x.isfinite()
        if exact:
            assert torch.equal(x[finite], y[finite]), what
        else:
            bad = finite & ((x - y).abs() > rtol * y.abs() + atol)
            assert not bad.any(), f"{what}: {x[bad][:5].tolist()} vs {y[bad][:5].tolist()}"

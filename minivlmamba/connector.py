"""The MultiModal Connector (MMC, paper section 3.3): patch features -> visual tokens for the LM.

Shape legend: b batch, p image patches, hp, wp patch grid, dv vision width, d LM width,
di inner width of the VSS (expand * its width), n state size, r dt rank, k scan directions.

A Mamba LM reads its input in one causal order, but an image has no natural order. The paper's
Vision Selective Scan (VSS) module therefore scans the patch grid in k orders at once and sums the
results, so every patch hears from patches on all sides:
- BSM (bidirectional, k = 2, the paper's final choice): row-major raster order, and its reverse.
- CSM (cross, k = 4): row-major, column-major, and the reverse of each (VMamba's cross-scan).

The VSS module follows VMamba's SS2D (classification/models/vmamba.py, forwardv0): in_proj ->
depthwise 3x3 conv over the grid -> SiLU -> one grouped selective scan with per-direction
x_proj / dt_proj / A / D (g = k) -> re-order each direction to patch order and sum -> LayerNorm
-> gate by SiLU(z) -> out_proj. Parameter names are VMamba's.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange, repeat

from minivlmamba.mamba import init_dt
from minivlmamba.scan import selective_scan

CONNECTORS = ("mlp", "vss-mlp", "vss-l2")
SCANS = ("bsm", "csm")


def scan_orders(hp: int, wp: int, scan: str) -> torch.Tensor:
    """(k, p) patch indices: row i lists the patches in the order direction i visits them."""
    raster = torch.arange(hp * wp)  # (p,): patches are stored row-major
    if scan == "bsm":
        return torch.stack([raster, raster.flip(0)])
    if scan == "csm":
        column = rearrange(raster, "(hp wp) -> (wp hp)", hp=hp)  # (p,): walk down each column
        return torch.stack([raster, column, raster.flip(0), column.flip(0)])
    raise ValueError(f"unknown scan {scan!r}: expected one of {SCANS}")


class VSS(nn.Module):
    """Vision Selective Scan: one Mamba layer run over the patch grid in k directions. (b, p, width) -> same."""

    def __init__(self, width, hp, wp, scan="bsm", d_state=16, expand=2, scan_backend="auto"):
        super().__init__()
        order = scan_orders(hp, wp, scan)  # (k, p)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("unorder", order.argsort(dim=1), persistent=False)  # inverts each order
        k, di, n, r = order.shape[0], expand * width, d_state, math.ceil(width / 16)
        self.hp, self.wp, self.k, self.di, self.n, self.r = hp, wp, k, di, n, r
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(width, 2 * di, bias=False)
        self.conv2d = nn.Conv2d(di, di, 3, padding=1, groups=di)
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, di).uniform_(-di ** -0.5, di ** -0.5))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, di, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, di))
        init_dt(self.dt_projs_weight, self.dt_projs_bias)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * di, 1))
        self.Ds = nn.Parameter(torch.ones(k * di))
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, width, bias=False)

    def cross_scan(self, x):
        """(b, di, p) -> (b, k, di, p): the sequence each direction reads. (index_select, not x[:, :,
        order]: the same values, but advanced indexing's backward sorts the indices, ~1 ms a sample.)"""
        picked = x.index_select(2, rearrange(self.order, "k p -> (k p)"))  # (b, di, k*p)
        return rearrange(picked, "b di (k p) -> b k di p", k=self.k)

    def cross_merge(self, ys):
        """(b, k, di, p) -> (b, di, p): put each direction back in patch order, then sum."""
        b, _, di, _ = ys.shape
        index = repeat(self.unorder, "k p -> b k di p", b=b, di=di)  # a view: unorder read b * di times
        return torch.gather(ys, 3, index).sum(1)

    def forward(self, x):
        b, p, _ = x.shape
        k, di, n, r = self.k, self.di, self.n, self.r
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, p, di) each
        # (b, di, hp, wp), copied contiguous: a permuted view (rearrange straight to the grid) is
        # channels-last, and the conv would run another kernel and return channels-last output
        x = rearrange(x, "b p di -> b di p").reshape(b, di, self.hp, self.wp)
        x = rearrange(F.silu(self.conv2d(x)), "b di hp wp -> b di (hp wp)")  # 3x3 neighbourhoods mixed
        xs = self.cross_scan(x)  # (b, k, di, p)
        x_dbl = einsum(xs, self.x_proj_weight, "b k di p, k c di -> b k c p")  # (b, k, r + 2n, p)
        dts, Bs, Cs = x_dbl.split([r, n, n], dim=2)  # (b, k, r, p), (b, k, n, p), (b, k, n, p)
        deltas = einsum(dts, self.dt_projs_weight, "b k r p, k di r -> b k di p")  # (b, k, di, p)
        ys = selective_scan(rearrange(xs, "b k di p -> b (k di) p"), rearrange(deltas, "b k di p -> b (k di) p"),
                            -torch.exp(self.A_logs.float()), Bs, Cs, self.Ds.float(),
                            delta_bias=rearrange(self.dt_projs_bias.float(), "k di -> (k di)"),
                            delta_softplus=True, backend=self.scan_backend)  # (b, k * di, p), group i = direction i
        y = self.cross_merge(rearrange(ys, "b (k di) p -> b k di p", k=k))  # (b, di, p)
        y = rearrange(y, "b di p -> b p di")
        return self.out_proj(self.out_norm(y) * F.silu(z))  # (b, p, width)


def mlp(dv, d):
    """LLaVA-1.5's `mlp2x_gelu` projector; nn.Sequential keeps its `0.weight`, `2.weight` names."""
    return nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))


class Connector(nn.Module):
    """(b, p, dv) -> (b, p, d). kind is one of CONNECTORS, scan one of SCANS (paper equations 6-8)."""

    def __init__(self, kind, dv, d, grid, scan="bsm", d_state=16, expand=2, scan_backend="auto"):
        super().__init__()
        if kind not in CONNECTORS:
            raise ValueError(f"unknown connector {kind!r}: expected one of {CONNECTORS}")
        self.kind = kind
        vss_width = dv if kind == "vss-mlp" else d
        if kind != "mlp":
            self.vss = VSS(vss_width, grid, grid, scan, d_state, expand, scan_backend)
            self.norm = nn.LayerNorm(vss_width)
        if kind == "vss-l2":
            self.linear1, self.linear2 = nn.Linear(dv, d), nn.Linear(d, d)
        else:
            self.mlp = mlp(dv, d)

    def forward(self, x):
        if self.kind == "mlp":
            return self.mlp(x)
        if self.kind == "vss-mlp":  # V_out = MLP(Norm(VSS(V) + V))
            return self.mlp(self.norm(self.vss(x) + x))
        x1 = self.linear1(x)  # vss-l2: V' = Linear(V); V_out = Linear(Norm(VSS(GELU(V')) + V'))
        return self.linear2(self.norm(self.vss(F.gelu(x1)) + x1))

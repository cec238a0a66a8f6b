"""The building blocks of NVAE (Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational Autoencoder", NeurIPS 2020,
Sec. 3.1, Fig. 3 and App. A): weight-normalised convs, squeeze-excitation, the encoder residual cell, the decoder
inverted-residual cell, their down/up-sampling variants, and the shift-only autoregressive flow cell.

- Every cell returns skip(x) + 0.1·branch(x); the 0.1 keeps a deep stack of residual cells near the identity at init.
- Batch norm uses momentum 0.05 and eps 1e-5 (PyTorch's convention: running ← 0.95·running + 0.05·batch).
- `Conv2d` is weight-normalised, W = exp(log g)·V/‖V‖ per output channel, with log g initialised at log ‖V‖ so that W
  starts as PyTorch's default init; `effective_weight()` is what the spectral regulariser sees. The 1×1 and depthwise
  convs inside the inverted-residual branch are plain (weight_norm=False), as in NVAE; they are still `Conv2d`s so
  the regulariser sees them too (all conv layers count in NVAE's Σ σ_max).
- Down-sampling skip: a factorized reduce, four 1×1 stride-2 convs read at the four offsets of every 2×2 block and
  concatenated (channels ×2), so the skip sees every input pixel rather than one in four. We keep it linear (no
  activation before it) so the skip path stays a pure linear map, as in an ordinary residual network.
- Up-sampling: the branch up-samples nearest-neighbour ×2 after its first BN (the same statistics as before it:
  nearest up-sampling repeats every value 4 times); the skip is bilinear ×2 (corners aligned) followed by a
  bias-free 1×1 conv halving the channels, as in NVAE.
- Flow cell (NVAE's shift-only autoregressive cell): z' = z − μ(z), μ autoregressive in the order "position in raster
  order, then channel index": μ for channel c at position p sees every channel at strictly earlier positions and the
  channels < c at p (the mirrored cell reverses the positions, not the channels). The Jacobian is unit-triangular
  and log|det| = 0, as in NVAE's released flows. The flow does not see x: one bijection shared by q(·|x) and
  q(·|t(x)) keeps the CR-VAE KL between them exact when computed on the base Normals (KL is invariant under a common
  bijection).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_MOMENTUM = 0.05
BN_EPS = 1e-5
RESIDUAL_SCALE = 0.1
_WN_EPS = 1e-5  # keeps V/‖V‖ finite if a (masked) kernel ever has an all-zero row


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class Swish(nn.Module):
    """x·sigmoid(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


def _norms(weight: Tensor) -> Tensor:
    """(C_out, ...) -> (C_out, 1, 1, 1) L2 norm of each output channel's kernel."""
    return weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


class Conv2d(nn.Conv2d):
    """Conv2d with optional weight normalisation through a learnable log-norm per output channel.

    While `keep_weight` is set (the owning model sets it around a training forward), the first kernel the layer
    computes is kept in `kept_weight`: the spectral penalty reuses it, so each step normalises every weight once and
    backpropagates through that normalisation once.
    """

    keep_weight = False
    kept_weight: Tensor | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        weight_norm: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.weight_norm = weight_norm
        if weight_norm:
            self.log_weight_norm = nn.Parameter(torch.log(_norms(self.weight.detach()) + _WN_EPS))

    def direction(self) -> Tensor:
        """The unnormalised kernel V (subclasses mask it)."""
        return self.weight

    @torch.no_grad()
    def reset_log_norm(self) -> None:
        """Set log g = log ‖V‖ so the effective weight equals V."""
        self.log_weight_norm.copy_(torch.log(_norms(self.direction()) + _WN_EPS))

    def effective_weight(self) -> Tensor:
        """(C_out, C_in/groups, k, k): the kernel the convolution uses."""
        v = self.direction()
        if not self.weight_norm:
            return v
        # The per-channel factor g/‖V‖ first: one full-size product (and its backward) instead of two.
        return v * (torch.exp(self.log_weight_norm) / (_norms(v) + _WN_EPS))

    def forward(self, x: Tensor) -> Tensor:
        w = self.effective_weight()
        if self.keep_weight and self.kept_weight is None:
            self.__dict__["kept_weight"] = w  # not setattr: w is the Parameter itself without weight norm
        return self._conv_forward(x, w, self.bias)


def _channel_degrees(channels: int, ordered: int) -> Tensor:
    """Each of `channels` channels' place in an order of `ordered` latent channels: consecutive blocks of
    channels/ordered channels share one degree (a layer `ratio` times wider than the latent carries `ratio` features
    per latent channel)."""
    return torch.arange(channels) * ordered // channels


class MaskedConv2d(Conv2d):
    """Weight-normalised autoregressive conv, ordered by spatial position (raster order: row by row, left to right)
    and, within a position, by channel.

    Every channel has a degree, its place in the latent ordering (`_channel_degrees`, with as many degrees as the
    narrower side of the conv has channels). Taps at strictly earlier positions connect every input to every output;
    the centre tap connects input degree d_in to output degree d_out only if d_in < d_out (mask "A") or d_in <= d_out
    (mask "B"); later positions are cut. A depthwise conv (groups = channels) keeps or cuts its centre tap as a whole.
    Mirrored, the spatial order is reversed (the kernel mask is rotated by 180°); the channel order stays.
    `init_scale` multiplies the initial weight norm (log g starts at log ‖V‖ + log init_scale).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: str,
        mirror: bool = False,
        groups: int = 1,
        bias: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"MaskedConv2d: mask_type {mask_type!r} must be 'A' (strictly earlier) or 'B' (with self)")
        if kernel_size % 2 != 1:
            raise ValueError(f"MaskedConv2d: kernel_size {kernel_size} must be odd (the centre tap is the position)")
        depthwise = groups > 1
        if depthwise and not groups == in_channels == out_channels:
            raise ValueError(
                f"MaskedConv2d: groups={groups} is only supported as a depthwise conv (groups = in_channels = "
                f"out_channels), got in={in_channels}, out={out_channels}; use groups=1 or a depthwise layer"
            )
        if not depthwise and in_channels % out_channels and out_channels % in_channels:
            raise ValueError(
                f"MaskedConv2d: {in_channels} -> {out_channels} channels cannot share a channel order; one count must "
                "be a multiple of the other (e.g. the latent channels × an integer expansion)"
            )
        if not init_scale > 0:
            raise ValueError(f"MaskedConv2d: init_scale {init_scale} must be > 0 (it scales the initial weight norm)")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        c = kernel_size // 2
        spatial = torch.zeros(kernel_size, kernel_size)
        spatial[:c, :] = 1.0
        spatial[c, :c] = 1.0
        mask = spatial.expand(out_channels, in_channels // groups, kernel_size, kernel_size).clone()
        if depthwise:
            centre = torch.full((out_channels, 1), 1.0 if mask_type == "B" else 0.0)
        else:
            ordered = min(in_channels, out_channels)
            d_out = _channel_degrees(out_channels, ordered)[:, None]
            d_in = _channel_degrees(in_channels, ordered)[None, :]
            centre = (d_in < d_out) if mask_type == "A" else (d_in <= d_out)
        mask[:, :, c, c] = centre.float()
        if mirror:
            mask = mask.flip(2, 3)
        self.register_buffer("mask", mask, persistent=False)
        self.reset_log_norm()
        with torch.no_grad():
            self.log_weight_norm.add_(math.log(init_scale))

    def direction(self) -> Tensor:
        return self.weight * self.mask


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool, FC down to max(C/16, 4), ReLU, FC back up, sigmoid, scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))  # (B, C)
        return x * gate[:, :, None, None]


class FactorizedReduce(nn.Module):
    """Linear stride-2 skip: four 1×1 stride-2 convs at the offsets (0,0), (1,1), (0,1), (1,0), concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        quarter = out_channels // 4
        sizes = [quarter, quarter, quarter, out_channels - 3 * quarter]
        self.convs = nn.ModuleList(Conv2d(in_channels, n, 1, stride=2) for n in sizes)

    def forward(self, x: Tensor) -> Tensor:
        views = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(v) for conv, v in zip(self.convs, views)], dim=1)


class EncoderCell(nn.Module):
    """NVAE's `res_bnswish` cell: BN, Swish, 3×3 conv, BN, Swish, 3×3 conv, SE; out = skip + 0.1·branch.

    down=True: the first conv has stride 2 and doubles the channels; the skip is a factorized reduce.
    (B, C, H, W) -> (B, C, H, W), or (B, 2C, H/2, W/2) when down-sampling.
    """

    def __init__(self, channels: int, down: bool = False, use_se: bool = True) -> None:
        super().__init__()
        out = 2 * channels if down else channels
        self.branch = nn.Sequential(
            batch_norm(channels),
            Swish(),
            Conv2d(channels, out, 3, stride=2 if down else 1, padding=1),
            batch_norm(out),
            Swish(),
            Conv2d(out, out, 3, padding=1),
            SqueezeExcite(out) if use_se else nn.Identity(),
        )
        self.skip = FactorizedReduce(channels, out) if down else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class Upsample(nn.Module):
    mode = "nearest"  # also what a model pickled before `mode` existed gets

    def __init__(self, mode: str = "nearest") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return F.interpolate(x, scale_factor=2.0, mode=self.mode)


# Above this many channels PyTorch's CPU depthwise backward is slower in channels-last layout than in the default one
# (1536 channels, batch 4-16, 4×4 and 8×8 maps: 19-25 ms vs 3.5-12 ms forward + backward on one thread), while up to
# 1152 channels channels-last is as fast or faster (96-384 channels at 16×16 and 32×32: 2.5-3× faster).
_CPU_CHANNELS_LAST_MAX = 1152


class DepthwiseConv(Conv2d):
    """Plain depthwise 5×5 conv (no bias, no weight norm) that runs in channels-last layout where that is faster:
    always on GPU (a no-op when the model already runs channels-last, the GPU default), and on CPU up to
    `_CPU_CHANNELS_LAST_MAX` channels."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 5, padding=2, groups=channels, bias=False, weight_norm=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and self.in_channels > _CPU_CHANNELS_LAST_MAX:
            return super().forward(x.contiguous())
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class DecoderCell(nn.Module):
    """NVAE's inverted-residual cell (`mconv_e{expand}k5g0`): BN, 1×1 expand ×`expand`, BN, Swish, depthwise 5×5, BN,
    Swish, 1×1 back, BN, SE; out = skip + 0.1·branch. The inner convs are not weight-normalised and have no bias
    (a BN follows each).

    up=True: the branch up-samples ×2 after its first BN and the output has half the channels; the skip is bilinear ×2
    then a weight-normalised 1×1 conv without bias. (B, C, H, W) -> (B, C, H, W), or (B, C/2, 2H, 2W) when up-sampling.
    """

    def __init__(self, channels: int, expand: int = 6, up: bool = False, use_se: bool = True) -> None:
        super().__init__()
        if up and channels % 2:
            raise ValueError(f"DecoderCell: cannot halve {channels} channels when up-sampling; use an even count")
        out = channels // 2 if up else channels
        hidden = channels * expand
        self.branch = nn.Sequential(
            batch_norm(channels),
            Upsample() if up else nn.Identity(),
            Conv2d(channels, hidden, 1, bias=False, weight_norm=False),
            batch_norm(hidden),
            Swish(),
            DepthwiseConv(hidden),
            batch_norm(hidden),
            Swish(),
            Conv2d(hidden, out, 1, bias=False, weight_norm=False),
            batch_norm(out),
            SqueezeExcite(out) if use_se else nn.Identity(),
        )
        self.skip = nn.Sequential(Upsample("bilinear"), Conv2d(channels, out, 1, bias=False)) if up else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class ShiftFlowCell(nn.Module):
    """One shift-only autoregressive flow step z' = z − μ(z), log|det ∂z'/∂z| = 0 (NVAE's released flow cell).

    μ: mask-A 3×3 conv (C_z → 6·C_z, no bias), ELU, mask-B depthwise 5×5 (no bias), ELU, ELU, mask-B 1×1 (→ C_z,
    with bias, its weight norm starting at 0.1 of the usual so that the cell starts near the identity). The doubled
    ELU is NVAE's: its inverted-residual block ends with an ELU and its μ head starts with one. Every conv is
    weight-normalised. (B, C_z, h, w) -> same.
    """

    def __init__(self, latent_channels: int, mirror: bool = False, expand: int = 6) -> None:
        super().__init__()
        hidden = latent_channels * expand
        self.mu = nn.Sequential(
            MaskedConv2d(latent_channels, hidden, 3, "A", mirror, bias=False),
            nn.ELU(),
            MaskedConv2d(hidden, hidden, 5, "B", mirror, groups=hidden, bias=False),
            nn.ELU(),
            nn.ELU(),
            MaskedConv2d(hidden, latent_channels, 1, "B", mirror, init_scale=0.1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return z - self.mu(z)


class PairedFlow(nn.Module):
    """Two shift flow cells, the second in the mirrored order, so every position can depend on every other."""

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.cells = nn.Sequential(ShiftFlowCell(latent_channels), ShiftFlowCell(latent_channels, mirror=True))

    def forward(self, z: Tensor) -> Tensor:
        return self.cells(z)

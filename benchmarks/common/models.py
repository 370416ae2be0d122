"""Networks of the paper's Appendix I, for 32x32 inputs, plus tiny models for tests.

Use :func:`build_model` with a name from :data:`MODELS`:

* ``simplecnn`` - the Keras ``cifar10_cnn`` example without dropout, dense layer 128.
* ``vgg11`` - VGG-11 for CIFAR without BatchNorm and dropout, classifier ``Linear(512, C)``.
  ``vgg11_half`` and ``vgg11_quarter`` are the same network with every channel count
  multiplied by 0.5 and 0.25 (about 1/4 and 1/16 of the FLOPs), for CPU budgets.
* ``wresnet44_3`` - pre-activation Wide ResNet, depth 44, width 3, with BatchNorm.
* ``wresnet44_3_nobn`` - the same without BatchNorm, with SkipInit (De & Smith, 2020): each
  residual branch is scaled by a learnable scalar initialised to 0, and a learnable
  per-channel bias replaces each BatchNorm.
* ``densenet40_12`` - DenseNet (Huang et al., 2017), L=40, k=12, no bottleneck/compression.
* ``resnet26_nobn``, ``resnet56_nobn`` - CIFAR ResNets (He et al., 2016; 6n+2 layers,
  widths 16/32/64, parameter-free "option A" shortcuts) without BatchNorm, with Fixup
  initialisation (Zhang et al., 2019): scalar biases and multipliers, the last conv of
  each residual branch and the classifier initialised to zero, the first conv scaled by
  ``L ** -0.5`` (L = number of residual blocks).
* ``resnet20``, ``resnet44`` - CIFAR ResNets (He et al., 2016, Sec. 4.2; 6n+2 layers, n=3/7,
  widths 16/32/64) with BatchNorm (post-activation basic blocks, global average pooling,
  ``Linear(64, C)``). Shortcuts "option A" (identity; zero-padded channels and stride-2
  subsampling where the shape changes, parameter-free, as in He et al.'s CIFAR models:
  ResNet-44 has 0.66M parameters) by default; ``resnet44_b`` uses "option B" (1x1 conv + BN
  projections where the shape changes). ``resnet20_pool16`` is ResNet-20 on the 16x16
  average-pooled image (about 4x cheaper), for BatchNorm runs at a CPU budget.
* ``small_cnn`` and ``small_cnn_bn`` - a 72k-parameter CNN on the 16x16 pooled image, without
  and with BatchNorm (:func:`small_cnn`), for large-batch runs on one CPU core.
* ``vgg16_bn`` - VGG-16 (configuration D) for 32x32 with BatchNorm after every conv, no
  dropout, classifier ``Linear(512, C)`` (Wen et al.'s "VGG16" row of Table 2).
* ``tiny`` (small CNN with one BatchNorm) and ``tiny_mlp`` - a few thousand parameters,
  for tests.
* ``moe_mlp`` - a top-2-of-4 routed mixture of GELU MLP experts on the pooled image
  (:class:`MoEMLP`), a network whose routing is piecewise.

Convolutions use Kaiming-normal (fan-in, ReLU) initialisation with zero biases; linear
layers keep PyTorch's default; BatchNorm starts at weight 1, bias 0. ``build_model(...,
init=...)`` picks another scheme for every conv and linear layer (:data:`INITS`). The paper
does not state its initialisation, and the scale of Tr(F) depends on it: at initialisation,
SimpleCNN's Tr(F) on CIFAR-10 is 570 to 2,200 with ``"kaiming"``, about 80 with ``"glorot"``
(the Keras example's default) and about 3 with ``"torch"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INITS",
    "MODELS",
    "Bias2d",
    "DenseNet",
    "FixupResNet",
    "PreActResNet",
    "ResNet",
    "build_model",
    "init_weights",
    "simple_cnn",
    "mlp",
    "small_cnn",
    "tiny_cnn",
    "tiny_mlp",
    "vgg",
]


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-in, ReLU) conv weights, zero conv biases, unit/zero BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class Bias2d(nn.Module):
    """Learnable per-channel bias (initialised to 0): stands in for a removed BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the bias."""
        return x + self.bias


# --------------------------------------------------------------------------------------
# Plain CNNs
# --------------------------------------------------------------------------------------


def simple_cnn(num_classes: int = 10) -> nn.Sequential:
    """Keras ``cifar10_cnn`` without dropout (``Linear(64*6*6, 128)`` head) for 32x32."""
    return init_weights(
        nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 6 * 6, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )
    )


VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def vgg(
    num_classes: int = 10,
    cfg: tuple[int | str, ...] = VGG11_CFG,
    batch_norm: bool = False,
    width: float = 1.0,
) -> nn.Sequential:
    """CIFAR VGG (3x3 convs, padding 1, ReLU; ``"M"`` = 2x2 max-pool), ``Linear(512·width, C)``.

    Without BatchNorm and dropout by default (the paper's VGG-11 setting). ``width`` multiplies
    every layer's channel count (rounded, at least 1): ``width=0.25`` is VGG-11 with channels
    16-32-64-128, about 1/16 of the FLOPs, for CPU budgets (the ``vgg11_quarter`` model).
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout = max(1, round(int(v) * width))
        layers.append(nn.Conv2d(cin, cout, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        cin = cout
    layers += [nn.Flatten(), nn.Linear(cin, num_classes)]
    return init_weights(nn.Sequential(*layers))


def small_cnn(
    num_classes: int = 10, width: int = 16, pool: int = 16, batch_norm: bool = False
) -> nn.Sequential:
    """Two conv3x3-ReLU-maxpool stages (``width``, 2·width channels) on the ``pool``x``pool``
    average-pooled image, then ``Linear(·, 128)``-ReLU-``Linear(128, C)``; with
    ``batch_norm`` a ``BatchNorm2d`` follows each conv (``small_cnn_bn``).

    72k parameters at the defaults (10 classes), ~13x cheaper than SimpleCNN per image on a
    CPU, so large-batch runs with thousands of updates and per-example gradients (Fisher
    noise, Wen et al., 2020) fit one core.
    """
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool)]
    cin = 3
    for cout in (width, 2 * width):
        layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        cin = cout
    layers += [
        nn.Flatten(),
        nn.Linear(cin * (pool // 4) ** 2, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    ]
    return init_weights(nn.Sequential(*layers))


def tiny_cnn(num_classes: int = 10) -> nn.Sequential:
    """About 1.6k parameters (10 classes) with one BatchNorm; any input size."""
    return init_weights(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, num_classes),
        )
    )


def tiny_mlp(num_classes: int = 10, hidden: int = 32) -> nn.Sequential:
    """MLP on the 8x8-average-pooled image: ``192 -> hidden -> C`` (6.5k params at C=10)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(8),
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def mlp(num_classes: int = 10, hidden: int = 256, depth: int = 2, pool: int = 8) -> nn.Sequential:
    """ReLU MLP on the ``pool``x``pool``-average-pooled image: ``3·pool² -> hidden (× depth) -> C``.

    118k parameters at the defaults (10 classes), no BatchNorm: small enough that per-example
    gradients (Fisher noise, Wen et al., 2020) and thousands of large-batch updates fit one
    CPU core, large enough to fit a 5,000-image CIFAR-10 training set.
    """
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
    cin = 3 * pool * pool
    for _ in range(depth):
        layers += [nn.Linear(cin, hidden), nn.ReLU(inplace=True)]
        cin = hidden
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


class MoEMLP(nn.Module):
    """A mixture-of-experts MLP on the 8x8-average-pooled image, top-k routed: a linear
    router scores ``experts`` GELU MLPs (``192 -> hidden -> hidden``) per example, the top
    ``k`` are mixed with softmax weights over their scores, and a linear head maps to the C
    classes. Routing (``torch.topk``) is piecewise: which experts an example uses jumps as
    the scores cross.
    """

    def __init__(
        self, num_classes: int = 10, experts: int = 4, k: int = 2, hidden: int = 128
    ) -> None:
        super().__init__()
        if not 1 <= k <= experts:
            raise ValueError(f"k must be in 1..experts ({experts}), got {k}")
        self.k = k
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten())
        self.router = nn.Linear(192, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(192, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            for _ in range(experts)
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(x)
        top = self.router(h).topk(self.k, dim=-1)
        weights = torch.softmax(top.values, dim=-1)  # [B, k]
        outs = torch.stack([e(h) for e in self.experts], dim=1)  # [B, E, hidden]
        chosen = outs.gather(1, top.indices[..., None].expand(-1, -1, outs.shape[-1]))
        return self.head((weights[..., None] * chosen).sum(1))


# --------------------------------------------------------------------------------------
# Pre-activation (Wide) ResNet, with BatchNorm or SkipInit
# --------------------------------------------------------------------------------------


class _PreActBlock(nn.Module):
    """norm-ReLU-conv3x3-norm-ReLU-conv3x3 (+ shortcut); ``skipinit`` scales the branch."""

    def __init__(
        self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module], skipinit: bool
    ) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(cin), _conv3x3(cin, cout, stride)
        self.norm2, self.conv2 = norm(cout), _conv3x3(cout, cout)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else None
        )
        self.alpha = nn.Parameter(torch.zeros(())) if skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward pass."""
        out = F.relu(self.norm1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        if self.alpha is not None:
            out = out * self.alpha
        return skip + out


class PreActResNet(nn.Module):
    """Pre-activation Wide ResNet for CIFAR (He et al., 2016b; Zagoruyko & Komodakis, 2016).

    ``depth = 6 * n + 2`` with ``n`` basic blocks per stage (``(44 - 2) / 6 = 7`` for
    depth 44), stage widths ``16k, 32k, 64k`` for width ``k``. With ``batch_norm=False``
    every BatchNorm is replaced by :class:`Bias2d` and SkipInit scalars (init 0) multiply
    each residual branch.
    """

    def __init__(
        self, depth: int = 44, width: int = 3, num_classes: int = 10, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if batch_norm else Bias2d
        self.conv = _conv3x3(3, 16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, base in enumerate((16, 32, 64)):
            cout = base * width
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_PreActBlock(cin, cout, stride, norm, not batch_norm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm(cin)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        out = F.relu(self.norm(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------------------
# CIFAR ResNet without BatchNorm, Fixup initialisation
# --------------------------------------------------------------------------------------


class _FixupBlock(nn.Module):
    """He et al. basic block without BN, with Fixup scalar biases and multiplier."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = (
            nn.Parameter(torch.zeros(())) for _ in range(4)
        )
        self.scale = nn.Parameter(torch.ones(()))
        self.conv1 = _conv3x3(cin, cout, stride)
        self.conv2 = _conv3x3(cout, cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward pass (parameter-free "option A" shortcut)."""
        out = F.relu(self.conv1(x + self.bias1a) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        skip = x
        if self.stride != 1 or self.extra:
            skip = (x + self.bias1a)[:, :, :: self.stride, :: self.stride]
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + skip)


class FixupResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (widths 16/32/64) without BatchNorm, Fixup-initialised."""

    def __init__(self, depth: int = 26, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = _conv3x3(3, 16)
        self.bias1 = nn.Parameter(torch.zeros(()))
        blocks: list[_FixupBlock] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_FixupBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bias2 = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)
        for b in blocks:  # Fixup: scale branch-in convs by L^(-1/(2m-2)), m=2; zero the rest
            with torch.no_grad():
                b.conv1.weight.mul_(len(blocks) ** -0.5)
            nn.init.zeros_(b.conv2.weight)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        out = self.blocks(F.relu(self.conv(x) + self.bias1))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1) + self.bias2)


# --------------------------------------------------------------------------------------
# CIFAR ResNet with BatchNorm (He et al., 2016)
# --------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut), ReLU after the addition."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin
        self.proj: nn.Module | None = None
        if shortcut == "B" and (stride != 1 or cin != cout):
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward pass."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.proj is not None:
            skip = self.proj(x)
        elif self.stride != 1 or self.extra:  # option A: subsample, zero-pad the channels
            skip = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
        else:
            skip = x
        return F.relu(out + skip)


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with BatchNorm (He et al., 2016, Sec. 4.2), widths 16/32/64.

    ``shortcut="A"``: parameter-free identity shortcuts (zero-padded channels, stride-2
    subsampling) as in the paper's CIFAR experiments; ``"B"``: 1x1 conv + BN projections
    where the shape changes.
    """

    def __init__(self, depth: int = 44, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv = _conv3x3(3, 16)
        self.bn = nn.BatchNorm2d(16)
        blocks: list[_BasicBlock] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------


def _bn_relu_conv(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
    )


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.f = _bn_relu_conv(cin, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the input with ``growth`` new feature maps."""
        return torch.cat([x, self.f(x)], 1)


class DenseNet(nn.Module):
    """CIFAR DenseNet (Huang et al., 2017) without bottleneck or compression.

    Three dense blocks of ``(depth - 4) / 3`` BN-ReLU-conv3x3 layers (12 for L=40), growth
    ``k``, transitions BN-ReLU-conv1x1-avgpool2, an initial conv with ``init_channels``
    outputs (16, as Huang et al. use for non-BC DenseNets; DenseNet-BC uses ``2k``),
    final BN-ReLU-global-avgpool-linear. L=40, k=12 has 1.02M parameters for 10 classes
    (the "1.0M" of the DenseNet paper; 1.06M with ``init_channels=24``).
    """

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        num_classes: int = 10,
        init_channels: int = 16,
    ) -> None:
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"depth must be 3n+4, got {depth}")
        n = (depth - 4) // 3
        c = init_channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if block < 2:
                layers += [_bn_relu_conv(c, c, 1), nn.AvgPool2d(2)]
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "simplecnn": simple_cnn,
    "vgg11": vgg,
    "vgg11_half": lambda c: vgg(c, width=0.5),
    "vgg11_quarter": lambda c: vgg(c, width=0.25),
    "wresnet44_3": lambda c: PreActResNet(44, 3, c, batch_norm=True),
    "wresnet44_3_nobn": lambda c: PreActResNet(44, 3, c, batch_norm=False),
    "densenet40_12": lambda c: DenseNet(40, 12, c),
    "resnet26_nobn": lambda c: FixupResNet(26, c),
    "resnet56_nobn": lambda c: FixupResNet(56, c),
    "small_cnn": small_cnn,
    "small_cnn_bn": lambda c: small_cnn(c, batch_norm=True),
    "tiny": tiny_cnn,
    "tiny_mlp": tiny_mlp,
    "mlp": mlp,
    "moe_mlp": MoEMLP,
    "resnet20": lambda c: ResNet(20, c),
    "resnet20_pool16": lambda c: nn.Sequential(nn.AdaptiveAvgPool2d(16), ResNet(20, c)),
    "resnet44": lambda c: ResNet(44, c),
    "resnet44_b": lambda c: ResNet(44, c, shortcut="B"),
    "vgg16_bn": lambda c: vgg(c, VGG16_CFG, batch_norm=True),
}


#: Initialisation schemes of :func:`build_model`: ``"kaiming"`` keeps each model's own
#: (above); ``"torch"`` resets every ``Conv2d``/``Linear`` to PyTorch's default (weights and
#: biases uniform in ``±1/sqrt(fan_in)``); ``"glorot"`` is Keras's default: Glorot-uniform
#: weights, zero biases. The last two replace a model's special scheme too (Fixup's and
#: SkipInit's zero-initialised layers).
INITS = ("kaiming", "torch", "glorot")


def build_model(name: str, num_classes: int = 10, init: str = "kaiming") -> nn.Module:
    """Instantiate model ``name`` (a key of :data:`MODELS`) with ``num_classes`` outputs,
    its conv and linear layers initialised by ``init`` (one of :data:`INITS`)."""
    try:
        factory = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    model = factory(num_classes)
    if init == "kaiming":
        return model
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if init == "torch":
            m.reset_parameters()
        else:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model

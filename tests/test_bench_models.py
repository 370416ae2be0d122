"""Tests for benchmarks/common/models.py: shapes, parameter counts, BN-free models."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_models = importlib.import_module("benchmarks.common.models")
MODELS, DenseNet, build_model = _models.MODELS, _models.DenseNet, _models.build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape_and_head(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    # only the classifier depends on the number of classes
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == num_classes
    assert n_params(model) - n_params(build_model(name, 1)) == (num_classes - 1) * (
        head.in_features + 1
    )


def test_simplecnn_param_count() -> None:
    expected = (
        conv(3, 32)
        + conv(32, 32)
        + conv(32, 64)
        + conv(64, 64)
        + linear(64 * 6 * 6, 128)
        + linear(128, 10)
    )
    assert expected == 361_898
    assert n_params(build_model("simplecnn", 10)) == expected


def test_vgg11_param_count() -> None:
    widths = [3, 64, 128, 256, 256, 512, 512, 512, 512]
    expected = sum(conv(a, b) for a, b in itertools.pairwise(widths)) + linear(512, 100)
    assert n_params(build_model("vgg11", 100)) == expected
    assert sum(isinstance(m, nn.MaxPool2d) for m in build_model("vgg11", 10).modules()) == 5


def test_wide_resnet_params() -> None:
    n, k = 7, 3

    def stage(cin: int, cout: int) -> int:  # n pre-act blocks, 1x1 shortcut if needed
        first = conv(cin, cout, bias=False) + conv(cout, cout, bias=False)
        first += cin * cout if cin != cout else 0
        return first + (n - 1) * 2 * conv(cout, cout, bias=False)

    convs = conv(3, 16, bias=False) + stage(16, 16 * k) + stage(16 * k, 32 * k)
    convs += stage(32 * k, 64 * k)
    norm_channels = sum(
        [16]
        + [16 * k] * (2 * n - 1)
        + [16 * k, 32 * k]
        + [32 * k] * (2 * n - 2)
        + [32 * k, 64 * k]
        + [64 * k] * (2 * n - 2)
        + [64 * k]
    )
    with_bn = build_model("wresnet44_3", 10)
    no_bn = build_model("wresnet44_3_nobn", 10)
    assert n_params(with_bn) == convs + 2 * norm_channels + linear(64 * k, 10)
    # SkipInit: one bias per former BN channel, one scalar per residual block (3n)
    assert n_params(no_bn) == convs + norm_channels + 3 * n + linear(64 * k, 10)
    assert 5e6 < n_params(with_bn) < 7e6
    # 43 weighted 3x3 convs (+ the classifier = depth 44) and one 1x1 shortcut per stage
    assert sum(isinstance(m, nn.Conv2d) for m in with_bn.modules()) == 43 + 3


def test_densenet_param_count() -> None:
    # Huang et al. report 1.0M parameters for DenseNet (L=40, k=12) on CIFAR-10.
    assert 0.95e6 < n_params(build_model("densenet40_12", 10)) < 1.1e6
    model = build_model("densenet40_12", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 36 + 2  # L = 40 counts these plus the classifier
    assert model.fc.in_features == 16 + 3 * 12 * 12
    assert DenseNet(40, 12, 10, init_channels=24).fc.in_features == 24 + 3 * 12 * 12


def test_fixup_resnets() -> None:
    for name, depth in (("resnet26_nobn", 26), ("resnet56_nobn", 56)):
        model = build_model(name, 10)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) + 1 == depth  # option-A shortcuts are parameter-free
    assert 0.3e6 < n_params(build_model("resnet26_nobn", 10)) < 0.45e6
    assert 0.8e6 < n_params(build_model("resnet56_nobn", 10)) < 0.9e6


@pytest.mark.parametrize(
    "name",
    [
        "simplecnn",
        "vgg11",
        "wresnet44_3_nobn",
        "resnet26_nobn",
        "resnet56_nobn",
        "tiny_mlp",
        "small_cnn",
        "mlp",
    ],
)
def test_bn_free_models(name: str) -> None:
    assert not has_bn(build_model(name, 10))


def test_bn_models() -> None:
    for name in ("wresnet44_3", "densenet40_12", "tiny"):
        assert has_bn(build_model(name, 10))
    tiny = build_model("tiny", 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tiny.modules()) == 1
    assert 1000 <= n_params(tiny) <= 3000
    assert n_params(build_model("tiny_mlp", 10)) < 10_000


def test_small_cnn_and_mlp_param_counts() -> None:
    # small_cnn: 16x16 average pool, conv 3->16, pool, conv 16->32, pool, 32*4*4 -> 128 -> 10
    expected = conv(3, 16) + conv(16, 32) + linear(32 * 4 * 4, 128) + linear(128, 10)
    assert expected == 72_042
    assert n_params(build_model("small_cnn", 10)) == expected
    # mlp: 8x8 average pool, 192 -> 256 -> 256 -> 10
    expected = linear(3 * 8 * 8, 256) + linear(256, 256) + linear(256, 10)
    assert expected == 117_770
    assert n_params(build_model("mlp", 10)) == expected


def test_small_cnn_sees_the_pooled_image() -> None:
    # the first layer is the average pool: inputs with equal 2x2 block means give equal outputs
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    x = torch.randn(2, 3, 32, 32)
    block_mean = nn.functional.avg_pool2d(x, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(model(x), model(block_mean))


@pytest.mark.parametrize("name", ["wresnet44_3_nobn", "resnet26_nobn"])
def test_bn_free_resnets_train(name: str) -> None:
    """SkipInit/Fixup nets start near the identity and take useful gradient steps."""
    torch.manual_seed(0)
    model = build_model(name, 10)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="simplecnn.*vgg11"):
        build_model("resnet18", 10)


def _cifar_resnet_params(n: int, num_classes: int, shortcut: str = "A") -> int:
    """conv3x3 (no bias) + BN per layer; option A shortcuts are parameter-free."""
    bn = 2  # weight and bias per channel
    total = conv(3, 16, bias=False) + bn * 16
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(n):
            total += conv(cin, cout, bias=False) + conv(cout, cout, bias=False) + 2 * bn * cout
            if shortcut == "B" and stage > 0 and i == 0:
                total += cin * cout + bn * cout
            cin = cout
    return total + linear(64, num_classes)


def test_resnet44_param_count() -> None:
    expected = _cifar_resnet_params(7, 10)
    assert expected == 658_586  # He et al. (2016), Table 6: ResNet-44 has 0.66M parameters
    model = build_model("resnet44", 10)
    assert n_params(model) == expected
    assert has_bn(model)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 43
    assert n_params(build_model("resnet44_b", 10)) == _cifar_resnet_params(7, 10, "B")
    assert n_params(build_model("resnet20", 10)) == _cifar_resnet_params(3, 10) == 269_722


def test_vgg16_bn_param_count() -> None:
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    expected = sum(conv(a, b) + 2 * b for a, b in itertools.pairwise(widths)) + linear(512, 10)
    model = build_model("vgg16_bn", 10)
    assert n_params(model) == expected
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


def test_init_schemes() -> None:
    """``init`` re-initialises every conv/linear layer: PyTorch's default is uniform in
    ±1/sqrt(fan_in) (std 1/sqrt(3 fan_in)), Keras's Glorot-uniform has std
    sqrt(2/(fan_in+fan_out)) and zero biases; "kaiming" is the model as built."""
    torch.manual_seed(0)
    ref = build_model("simplecnn")
    torch.manual_seed(0)
    same = build_model("simplecnn", init="kaiming")
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), same.parameters(), strict=True))
    for init in ("torch", "glorot"):
        model = build_model("simplecnn", init=init)
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(layers) == 6
        for m in layers:
            w = m.weight
            fan_in = w[0].numel()
            fan_out = w.shape[0] * w[0, 0].numel()
            if init == "torch":
                bound = fan_in**-0.5
                assert w.abs().max() <= bound and m.bias.abs().max() <= bound
                want = (3 * fan_in) ** -0.5
            else:
                assert torch.count_nonzero(m.bias) == 0
                want = (2 / (fan_in + fan_out)) ** 0.5
            assert abs(w.std().item() / want - 1) < 0.15, (init, tuple(w.shape))
    with pytest.raises(ValueError, match="kaiming, torch, glorot"):
        build_model("simplecnn", init="xavier")


def test_small_cnn_bn_and_pooled_resnet20() -> None:
    plain, with_bn = build_model("small_cnn", 10), build_model("small_cnn_bn", 10)
    assert not has_bn(plain) and has_bn(with_bn)
    # BatchNorm replaces each conv's bias by its own weight and bias: +16 + 32 parameters
    assert n_params(with_bn) == n_params(plain) + 16 + 32
    pooled = build_model("resnet20_pool16", 10)
    assert n_params(pooled) == 269_722
    x = torch.randn(2, 3, 32, 32)
    assert pooled(x).shape == with_bn(x).shape == (2, 10)

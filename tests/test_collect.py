import torch

import moekit
from tests.builders import make_moe


class TwoLayerNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.moe1 = make_moe()
        self.moe2 = make_moe(aux_loss=moekit.AuxLossConfig(switch=0.1, z_loss=0.01))
        self.inner = torch.nn.ModuleDict({"moe3": make_moe(num_experts=6)})

    def forward(self, x):
        x = x + self.moe1(x).output
        x = x + self.moe2(x).output
        x = x + self.moe2(x).output  # a layer called twice counts twice
        return x + self.inner["moe3"](x).output


def test_collect_moe_outputs_sums_every_call():
    net = TwoLayerNet()
    x = torch.randn(2, 5, 8)
    with moekit.collect_moe_outputs(net) as collected:
        net(x)
    assert set(collected.outputs) == {"moe1", "moe2", "inner.moe3"}
    assert len(collected.outputs["moe2"]) == 2
    manual = sum(o.aux_loss for calls in collected.outputs.values() for o in calls)
    torch.testing.assert_close(collected.aux_loss(), manual)
    assert collected.aux_loss().requires_grad
    assert collected.stats()["inner.moe3"].tokens_per_expert.shape == (6,)
    # hooks are removed on exit
    with moekit.collect_moe_outputs(net) as again:
        pass
    net(x)
    assert again.outputs == {}


def test_serving_skips_losses_and_statistics_but_not_outputs():
    net = TwoLayerNet().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), moekit.collect_moe_outputs(net) as plain:
        expected = net(x)
    with torch.no_grad(), moekit.serving(net) as switched, moekit.collect_moe_outputs(net) as seen:
        served = net(x)
    assert switched == 3
    assert torch.equal(served, expected)
    for calls in seen.outputs.values():
        for out in calls:
            assert out.losses == {} and out.stats is None and float(out.aux_loss) == 0.0
    assert float(plain.aux_loss()) > 0  # the same calls outside serving do have losses
    # settings are restored on exit, also after an error
    assert all(
        m.losses_enabled and m.statistics for m in net.modules() if isinstance(m, moekit.MoE)
    )
    try:
        with moekit.serving(net):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(m.losses_enabled for m in net.modules() if isinstance(m, moekit.MoE))


def test_without_statistics_keeps_losses_and_restores_each_layers_setting():
    net = TwoLayerNet()
    moekit.set_statistics(net.inner, False)  # a layer built or set without statistics
    x = torch.randn(2, 5, 8)
    with moekit.collect_moe_outputs(net) as plain:
        expected = net(x)
    with moekit.without_statistics(net) as switched, moekit.collect_moe_outputs(net) as seen:
        quiet = net(x)
    assert switched == 3
    assert torch.equal(quiet, expected)
    torch.testing.assert_close(seen.aux_loss(), plain.aux_loss())  # losses are kept
    assert seen.outputs["moe2"][0].losses.keys() == plain.outputs["moe2"][0].losses.keys()
    assert all(out.stats is None for calls in seen.outputs.values() for out in calls)
    assert [m.statistics for m in net.modules() if isinstance(m, moekit.MoE)] == [True, True, False]

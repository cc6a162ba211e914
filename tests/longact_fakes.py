"""Stand-ins for megatron attention layers, with the hook points LongAct uses, for tests that feed
chosen q/k tensors straight into the statistics collector."""

from types import SimpleNamespace

from torch import nn


class FakeCoreAttention(nn.Module):
    def forward(self, query, key, value, attention_mask=None):
        return query


class FakeAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_layernorm = nn.Identity()
        self.k_layernorm = nn.Identity()
        self.core_attention = FakeCoreAttention()

    def run(self, q_SBHD, k_SBGD):
        q, k = self.q_layernorm(q_SBHD), self.k_layernorm(k_SBGD)
        return self.core_attention(q, k, k)


class FakeLayer(nn.Module):
    def __init__(self, layer_number):
        super().__init__()
        self.layer_number = layer_number
        self.self_attention = FakeAttention()


def fake_model(first_layer_number, num_layers):
    layers = [FakeLayer(first_layer_number + i) for i in range(num_layers)]
    return SimpleNamespace(decoder=SimpleNamespace(layers=layers))


def run_layers(model, q_LSBHD, k_LSBGD):
    for layer, q, k in zip(model.decoder.layers, q_LSBHD, k_LSBGD):
        layer.self_attention.run(q, k)

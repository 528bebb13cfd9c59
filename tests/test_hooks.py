import pytest
import torch
from torch import nn

from probes.lm.hooks import capture, layer_output
from probes.lm.layers import decoder_layers, normalise_layer


def test_capture_equals_output_hidden_states(tiny_lm):
    ids = tiny_lm.tokenizer(["How do I bake bread?"], return_tensors="pt")
    layers = list(range(tiny_lm.num_layers))
    with torch.inference_mode(), capture(tiny_lm.model, layers) as store:
        out = tiny_lm.model(**ids, output_hidden_states=True)
    assert set(store) == set(layers)
    for layer in layers[:-1]:  # the last hidden_states entry has the final norm applied
        torch.testing.assert_close(store[layer], out.hidden_states[layer + 1], rtol=0, atol=0)
    torch.testing.assert_close(tiny_lm.model.model.norm(store[layers[-1]]), out.hidden_states[-1])


def test_hooks_are_removed_even_on_error(tiny_lm):
    layers = decoder_layers(tiny_lm.model)
    before = [len(layer._forward_hooks) for layer in layers]  # transformers keeps hooks of its own there
    with pytest.raises(RuntimeError), capture(tiny_lm.model, [0, 1]):
        assert len(layers[0]._forward_hooks) == before[0] + 1
        raise RuntimeError("boom")
    assert [len(layer._forward_hooks) for layer in layers] == before


def test_layer_output_unwraps_tuples():
    t = torch.ones(1, 2, 3)
    assert layer_output((t, None)) is t
    assert layer_output(t) is t


def test_unknown_architecture_error_says_how_to_fix():
    class Odd(nn.Module):
        pass

    with pytest.raises(ValueError, match="--layer-path"):
        decoder_layers(Odd())
    with pytest.raises(ValueError, match="does not name a ModuleList"):
        decoder_layers(Odd(), "blocks")


def test_gpt2_layout_is_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    assert len(decoder_layers(model)) == 2


def test_negative_layers_normalise():
    assert normalise_layer(-1, 30) == 29
    assert normalise_layer(3, 30) == 3
    with pytest.raises(ValueError, match="out of range"):
        normalise_layer(30, 30)

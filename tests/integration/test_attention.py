import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sepen.attention import (
    SepenAttnProcessor,
    available_resolutions,
    captured_layers,
    install_capture,
)
from sepen.errors import ResolutionError


def _unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.tensor([10, 500][:batch])
    emb = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, emb


def test_processor_output_equals_diffusers_default(tiny_pipe):
    unet = tiny_pipe.unet
    x, t, emb = _unet_inputs(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        reference = unet(x, t, emb).sample
    store = install_capture(unet, [16, 8, 4])
    with torch.no_grad():
        ours = unet(x, t, emb).sample
    assert (ours - reference).abs().max().item() <= 1e-5
    assert len(store.maps) == 7  # every cross-attention layer captured


def test_capture_records_probabilities_of_chosen_layers_only(tiny_pipe):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    assert store.captured == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    x, t, emb = _unet_inputs(unet)
    unet(x, t, emb)
    assert store.layer_names == store.captured
    for m in store.maps:
        assert m.shape == (2, 8, 8, 8, 77)  # batch, heads, h, w, tokens
        assert torch.allclose(m.sum(-1), torch.ones(2, 8, 8, 8), atol=1e-5)
        assert m.requires_grad
    agg = store.aggregate()
    assert torch.allclose(agg, torch.stack(store.maps).mean(0))
    # self-attention keeps diffusers' processor
    procs = unet.attn_processors
    assert all(not isinstance(p, SepenAttnProcessor) for k, p in procs.items() if "attn1" in k)


def test_multi_resolution_maps_are_upsampled_and_averaged(tiny_pipe):
    unet = tiny_pipe.unet
    store = install_capture(unet, [16, 8])
    unet(*_unet_inputs(unet, batch=1))
    agg = store.aggregate()
    assert agg.shape == (1, 8, 16, 16, 77)
    assert torch.allclose(agg.sum(-1), torch.ones(1, 8, 16, 16), atol=1e-5)


def test_resolution_without_cross_attention_lists_the_available_ones(tiny_pipe):
    assert sorted(available_resolutions(tiny_pipe.unet, 16)) == [4, 8, 16]
    with pytest.raises(ResolutionError, match=r"resolution \[12\].*available: \[16, 8, 4\]"):
        install_capture(tiny_pipe.unet, [12])
    # the grid follows the training latent size: 32x32 latents give 32/16/8 maps
    assert captured_layers(tiny_pipe.unet, [16], 32)[0].startswith("down_blocks.1")


def test_start_token_key_gets_no_gradient():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    hidden = torch.randn(1, 16, 16)
    context = torch.zeros(1, 5, 8)
    context[:, 0] = torch.randn(8)  # only the start token carries a key
    weights = torch.randn(1, 2, 4, 4, 5)
    for detach, expect_zero in [(True, True), (False, False)]:
        attn.zero_grad()
        from sepen.attention import AttentionStore

        store = AttentionStore(latent_size=(4, 4))
        attn.set_processor(SepenAttnProcessor("x", store, 1, detach_start_token=detach))
        attn(hidden, encoder_hidden_states=context)
        (store.maps[0] * weights).sum().backward()
        grad = attn.to_k.weight.grad
        assert (grad.abs().max().item() == 0.0) is expect_zero

import copy

import pytest
import torch

from sepen.attention import install_capture
from sepen.losses import norm_loss, total_loss
from sepen.trainable import original_weights, prepare_trainable, trainable_layers, value_layers


def _batch(unet, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.tensor([100, 800][:n])
    emb = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, emb


def test_trainable_layers_stop_at_the_last_captured_layer_without_norm_loss(tiny_pipe):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    no_norm = trainable_layers(unet, store.captured, norm_loss=False)
    assert no_norm[-1] == store.captured[-1]
    assert len(no_norm) == 5 and not any(n.startswith("up_blocks.2") for n in no_norm)
    assert len(trainable_layers(unet, store.captured, norm_loss=True)) == 7


@pytest.mark.parametrize("mode, count", [("to_k", 5), ("to_k+to_v", 9), ("lora", 10)])
def test_gradient_reaches_only_trainable_parameters(tiny_pipe, mode, count):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    layers = trainable_layers(unet, store.captured, norm_loss=False)
    values = value_layers(unet, store.captured, norm_loss=False)
    assert values == layers[:-1]
    params = prepare_trainable(unet, layers, mode, lora_rank=2, values=values)
    assert len(params) == count
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    x, t, emb = _batch(unet)
    unet(x, t, emb)
    maps = store.aggregate()[..., [2, 5]].permute(0, 4, 1, 2, 3)  # (B, N, H, h, w)
    total_loss(maps)["loss"].backward()
    for name, p in unet.named_parameters():
        if name in params:
            assert p.grad is not None, name
            if "lora_A" not in name:  # LoRA's B starts at zero, so A's first gradient is 0
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    optimizer.step()
    for name, p in unet.named_parameters():
        if name not in params:
            assert torch.equal(p, before[name]), name


def test_key_swap_norm_loss_equals_a_separate_frozen_copy(tiny_pipe):
    unet = tiny_pipe.unet
    frozen_copy = copy.deepcopy(unet)
    install_capture(unet, [8])
    install_capture(frozen_copy, [8])  # same processors: the two paths compute the same ops
    params = prepare_trainable(unet, trainable_layers(unet, [], norm_loss=True), "to_k")
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # pretend training moved the keys
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in params.items()}
    x, t, emb = _batch(unet)
    pred = unet(x, t, emb).sample
    with torch.no_grad(), original_weights(unet, originals):
        swapped = unet(x, t, emb).sample
    with torch.no_grad():
        reference = frozen_copy(x, t, emb).sample
    assert torch.equal(swapped, reference)
    assert norm_loss(pred, swapped).item() == pytest.approx(
        norm_loss(pred, reference).item(), rel=1e-6
    )
    assert norm_loss(pred, swapped).item() > 0
    for n, p in params.items():  # the trained weights are back
        assert torch.equal(p, trained[n])


def test_lora_frozen_prediction_disables_the_adapter(tiny_pipe):
    unet = tiny_pipe.unet
    x, t, emb = _batch(unet)
    with torch.no_grad():
        reference = unet(x, t, emb).sample
    params = prepare_trainable(unet, trainable_layers(unet, [], norm_loss=True), "lora", 2)
    with torch.no_grad():
        for n, p in params.items():
            if "lora_B" in n:
                p.add_(0.1)
        moved = unet(x, t, emb).sample
        with original_weights(unet, None):
            frozen = unet(x, t, emb).sample
    assert (moved - reference).abs().max() > 1e-4
    assert (frozen - reference).abs().max().item() <= 1e-6

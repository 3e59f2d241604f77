"""The finetuning objective: early exit, token columns and the key-swap norm loss change nothing
but the cost."""

import copy

import pytest
import torch

from sepen.attention import install_capture, run_until_captured
from sepen.objective import SepenObjective, StepInputs, compile_blocks, token_columns
from sepen.trainable import prepare_trainable, trainable_layers


def _inputs(unet, batch=2, seed=0, single=False):
    g = torch.Generator().manual_seed(seed)
    side, dim = unet.config.sample_size, unet.config.cross_attention_dim

    def draw():
        return (
            torch.randn(batch, 4, side, side, generator=g),
            torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, dim, generator=g),
        )

    positions = [[[2], [5, 6]], [[3, 4], [8]]][:batch]
    return StepInputs(*draw(), positions=positions, single=draw() if single else None)


def test_token_columns_index_each_concept_into_the_kept_columns():
    columns, groups = token_columns([[[2], [5, 6]], [[2], [8]]])
    assert columns.tolist() == [2, 5, 6, 8]
    assert groups == [[[0], [1, 2]], [[0], [3]]]


def test_early_exit_gives_the_full_pass_maps_and_skips_the_later_blocks(tiny_pipe):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    x = _inputs(unet)
    with torch.no_grad():
        unet(x.noisy, x.timesteps, x.emb)
        full = store.aggregate()
        calls = []
        hooks = [
            m.register_forward_hook(lambda *a, n=n: calls.append(n))
            for n, m in [
                ("up2", unet.up_blocks[2]),
                ("conv_out", unet.conv_out),
                ("up1", unet.up_blocks[1]),
            ]
        ]
        store.columns = torch.tensor([5, 2])
        early = run_until_captured(unet, store, x.noisy, x.timesteps, x.emb)
        for h in hooks:
            h.remove()
    assert calls == []  # up_blocks[1] raised inside, up_blocks[2] and conv_out never ran
    assert store.layer_names == store.captured and store.stop_after is None
    assert early.shape == (2, 8, 8, 8, 2)
    assert torch.equal(early, full[..., [5, 2]])
    store.enabled = False
    with pytest.raises(RuntimeError, match="did not run"):
        run_until_captured(unet, store, x.noisy, x.timesteps, x.emb)


@pytest.mark.parametrize("norm", [False, True])
def test_cheap_objective_equals_full_pass_all_columns_in_loss_and_gradients(tiny_pipe, norm):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    params = prepare_trainable(unet, trainable_layers(unet, store.captured, norm), "to_k")
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # move the keys away from the originals so the norm loss is not 0
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    x = _inputs(unet, single=norm)
    results = []
    for cheap in (True, False):
        objective = SepenObjective(
            unet, store, originals=originals, early_exit=cheap, capture_columns=cheap
        )
        parts = objective(x)
        parts["loss"].backward()
        results.append((parts, {n: p.grad.clone() for n, p in params.items()}))
        unet.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = results
    assert set(a) == set(b) == {"loss", "separate", "enhance"} | ({"norm"} if norm else set())
    for k in a:
        assert abs(a[k].item() - b[k].item()) < 1e-6
    assert not norm or a["norm"].item() > 1e-8
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-9), n
    assert any(g.abs().sum() > 0 for g in ga.values())


def test_key_swap_norm_loss_equals_a_frozen_copy_and_restores_the_keys(tiny_pipe):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    params = prepare_trainable(unet, trainable_layers(unet, store.captured, True), "to_k")
    frozen = copy.deepcopy(unet)
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in params.items()}
    x = _inputs(unet, single=True)
    objective = SepenObjective(unet, store, originals=originals)
    norm = objective.norm(x.single, None, objective.frozen(x.single)).item()
    store.enabled = False
    with torch.no_grad():
        pred = unet(*x.single).sample
        expected = (pred - frozen(*x.single).sample).pow(2).mean()
    assert abs(norm - expected.item()) < 1e-7 and expected.item() > 0
    assert all(torch.equal(p, trained[n]) for n, p in params.items())


def test_compile_blocks_leaves_the_captured_blocks_eager(tiny_pipe):
    unet = tiny_pipe.unet
    store = install_capture(unet, [8])
    count = compile_blocks(unet, store.captured)
    compiled = {n for n, m in unet.named_modules() if getattr(m, "_compiled_call_impl", None)}
    captured = {n.removesuffix(".attn2") for n in store.captured}
    assert count == len(compiled) > len(captured)
    assert not compiled & captured
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in compiled

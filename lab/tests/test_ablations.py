"""lab/ablations.py: the three ablations of the author's PRISM that need code (arch
prism-ablation). Each starts from exactly the weights PRISM draws at the same seed and size, with
its one change: no wpe; an untied read-out B that starts equal to D (so the two models start as the
same function) and then trains on its own; no iso-energy factor c (the attention update 1/c times
PRISM's for the same weights). Each is causal, its analysis path is its fast path, and it trains."""
import math

import pytest
import torch

from checkpoint import checkpoint_payload, load_model
from lab.ablations import AblationAttention, AblationConfig, PrismAblation
from model import Prism, PrismConfig, build_model

SIZES = dict(vocab_size=97, block_size=24, n_layer=2, n_embd=32, n_head=2, expansion=2)  # p = 32
ABLATIONS = {"no-wpe": {"position_embedding": False}, "untied": {"tied_readout": False},
             "no-iso": {"iso_energy": False}}
EVERY = {"none": {}, **ABLATIONS,
         "all": {"position_embedding": False, "tied_readout": False, "iso_energy": False}}


def prism(seed=0, **overrides):
    torch.manual_seed(seed)
    return Prism(PrismConfig(**{**SIZES, **overrides}))


def ablation(switches, seed=0, **overrides):
    torch.manual_seed(seed)
    return PrismAblation(AblationConfig(**{**SIZES, **overrides, **switches}))


def tokens(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SIZES["vocab_size"], (B, SIZES["block_size"]), generator=g)


def readout_name(layer):
    return f"transformer.h.{layer}.attn.readout"


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("seed", [0, 3])
def test_an_ablation_starts_from_prisms_weights_at_the_same_seed(name, seed):
    switches = EVERY[name]
    model, base = ablation(switches, seed), prism(seed)
    got, want = model.state_dict(), base.state_dict()
    untied = not switches.get("tied_readout", True)
    # every tensor PRISM has, bit for bit (its buffers too: λ, and no other weight)
    expected_keys = set(want) - ({"transformer.wpe.weight"}
                                 if not switches.get("position_embedding", True) else set())
    readouts = {readout_name(layer) for layer in range(SIZES["n_layer"])} if untied else set()
    assert set(got) == expected_keys | readouts
    for key in expected_keys:
        assert torch.equal(got[key], want[key]), key
    # the only new weights: B, equal to that layer's D
    for layer in range(SIZES["n_layer"]) if untied else ():
        assert torch.equal(got[readout_name(layer)], want[f"transformer.h.{layer}.attn.dictionary.weight"])
        assert got[readout_name(layer)].data_ptr() != got[f"transformer.h.{layer}.attn.dictionary.weight"].data_ptr()
    extra = sum(got[k].numel() for k in readouts) - (
        SIZES["block_size"] * SIZES["n_embd"] if not switches.get("position_embedding", True) else 0)
    assert model.get_num_params() == base.get_num_params() + extra
    # another seed draws another PRISM, and the ablation follows it
    assert not torch.equal(ablation(switches, seed + 1).transformer.wte.weight,
                           got["transformer.wte.weight"])


def test_with_every_switch_on_it_is_prism_logit_for_logit():
    idx = tokens()
    model, base = ablation({}), prism()
    assert all(isinstance(b.attn, AblationAttention) and b.attn.readout is None
               for b in model.transformer.h)
    assert torch.equal(model(idx)[0], base(idx)[0])
    model.set_progress(0.5)  # λ follows the same ramp
    base.set_progress(0.5)
    assert all(b.attn.noise_weight.item() == pytest.approx(0.055) for b in model.transformer.h)
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_no_wpe_has_no_position_embedding_and_embeds_tokens_alone():
    model, base = ablation(ABLATIONS["no-wpe"]), prism()
    assert not hasattr(model.transformer, "wpe") and hasattr(base.transformer, "wpe")
    assert "transformer.wpe.weight" not in model.state_dict()
    idx = tokens(B=1)
    assert torch.equal(model.embed(idx), model.transformer.wte(idx))
    assert torch.equal(model.embed(idx[:, 5:6], start=5), model.transformer.wte(idx[:, 5:6]))
    # with the position embedding set to 0, PRISM is this model, logit for logit
    with torch.no_grad():
        base.transformer.wpe.weight.zero_()
    assert torch.allclose(model(idx)[0], base(idx)[0], atol=1e-6)


def test_the_untied_read_out_starts_as_d_so_the_logits_start_as_prisms():
    model, base = ablation(ABLATIONS["untied"]), prism()
    for block, base_block in zip(model.transformer.h, base.transformer.h):
        B, D = block.attn.readout, block.attn.dictionary.weight
        assert isinstance(B, torch.nn.Parameter) and B is not D and B.shape == D.shape
        assert torch.equal(B, base_block.attn.dictionary.weight)
    idx = tokens()
    for progress in (0.0, 0.7):  # at any λ
        model.set_progress(progress)
        base.set_progress(progress)
        torch.testing.assert_close(model(idx)[0], base(idx)[0], rtol=0, atol=1e-6)
    # B is the read-out: changing it changes the output, and D no longer reads out
    attn = model.transformer.h[0].attn.eval()
    z = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = attn(z)
        attn.readout.mul_(2.0)
        torch.testing.assert_close(attn(z), 2 * before, rtol=1e-5, atol=1e-7)


def test_no_iso_is_one_over_c_times_prisms_attention_for_the_same_weights():
    model, base = ablation(ABLATIONS["no-iso"]), prism()
    c = 1 / math.sqrt(2 * SIZES["n_head"] * SIZES["expansion"])
    assert base.transformer.h[0].attn.iso_energy == pytest.approx(c)
    assert model.transformer.h[0].attn.iso_energy == 1.0
    z = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for block, base_block in zip(model.transformer.h, base.transformer.h):
            torch.testing.assert_close(block.attn(z), base_block.attn(z) / c, rtol=1e-5, atol=1e-6)
    # the same weights, a different model: no reparametrisation brings it back (model.py §5)
    assert not torch.allclose(model(tokens())[0], base(tokens())[0], atol=1e-4)


@pytest.mark.parametrize("name", EVERY)
def test_an_ablation_is_causal_and_its_analysis_path_is_its_fast_path(name):
    model = ablation(EVERY[name])
    model.set_progress(0.5)
    idx, targets = tokens(), tokens(seed=1)
    logits, loss = model(idx, targets)
    logits2, loss2, layers = model.analyze(idx, targets)
    torch.testing.assert_close(logits, logits2, rtol=1e-4, atol=1e-5)
    assert abs(loss.item() - loss2.item()) < 1e-5
    assert len(layers) == 2 and layers[0]["attn"].shape == (2, 4, 24, 24)  # 2 + 2 heads
    assert layers[0]["attn"].triu(diagonal=1).abs().max() == 0
    t = 13
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % SIZES["vocab_size"]
    after = model(changed)[0]
    assert torch.equal(logits[:, :t], after[:, :t])  # nothing before t sees token t
    assert not torch.allclose(logits[:, t], after[:, t])


@pytest.mark.parametrize("name", EVERY)
def test_an_ablation_trains(name):
    model = ablation(EVERY[name])
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    idx, targets = tokens(B=4), tokens(B=4, seed=1)
    losses = []
    for step in range(20):
        model.set_progress(step / 20)
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # it learns the batch
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    for block in model.transformer.h if not EVERY[name].get("tied_readout", True) else ():
        # B trained on its own: it has left D (which moved too)
        assert block.attn.readout.grad.abs().sum() > 0
        assert not torch.allclose(block.attn.readout, block.attn.dictionary.weight, atol=1e-4)


@pytest.mark.parametrize("name", EVERY)
def test_an_ablation_round_trips_through_a_checkpoint(name, tmp_path):
    model = ablation(EVERY[name])
    with torch.no_grad():  # move B off D: the checkpoint must keep them apart
        for block in model.transformer.h:
            if block.attn.readout is not None:
                block.attn.readout.add_(0.01)
    model.set_progress(0.3)
    torch.save(checkpoint_payload(model), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.arch == "prism-ablation" and isinstance(loaded, PrismAblation)
    idx = tokens()
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


def test_build_model_knows_the_arch_and_its_switches():
    model = build_model("prism-ablation", **SIZES, tied_readout=False)
    assert model.arch == "prism-ablation" and model.rope_pairs == "interleaved"
    assert model.head_groups() == ["signal"] * 2 + ["noise"] * 2
    assert model.subspaces(0).shape == (4, 32, 32)
    with pytest.raises(ValueError, match="no field 'untied'"):
        build_model("prism-ablation", **SIZES, untied=True)


def test_the_untied_read_out_costs_parameters_not_flops():
    """Tied, D is used twice per token (the projection and the read-out: 6 FLOPs per weight each);
    untied, B takes the read-out's use: the same FLOPs, Σ|D| more parameters."""
    from model import build_model

    sizes = dict(vocab_size=97, block_size=24, n_layer=2, n_embd=32, n_head=2)
    prism = build_model("prism", **sizes)
    untied = build_model("prism-ablation", **sizes, tied_readout=False)
    dictionaries = sum(b.attn.dictionary.weight.numel() for b in prism.transformer.h)
    assert untied.get_num_params() == prism.get_num_params() + dictionaries
    assert untied.flops_per_token() == prism.flops_per_token()

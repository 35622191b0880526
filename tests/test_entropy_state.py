"""state_dict() resume is bit-identical for every optimizer in entropy_opt."""

from __future__ import annotations

import copy

import pytest
import torch

from entropy_opt import SAM, SGLD, EntropyAdam, EntropySGD


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


DATA_SEED = 123


def batch(k: int):
    g = torch.Generator().manual_seed(DATA_SEED + k)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def train(model, opt, start: int, steps: int, counter: list[int]):
    def closure():
        opt.zero_grad()
        X, Y = batch(counter[0])
        counter[0] += 1
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


FACTORIES = {
    "entropy_sgd": lambda p, g: EntropySGD(
        p,
        lr=0.5,
        momentum=0.9,
        nesterov=True,
        L=4,
        noise=1e-3,
        gamma=0.03,
        scoping_rate=0.1,
        sgld_momentum=0.5,
        generator=g,
    ),
    "entropy_adam": lambda p, g: EntropyAdam(p, lr=1e-2, L=3, noise=1e-3, generator=g),
    "entropy_sgd_flat": lambda p, g: EntropySGD(p, lr=0.5, L=3, noise=1e-3, flat=True, generator=g),
    "sgld": lambda p, g: SGLD(p, lr=0.05, noise=1e-2, generator=g),
    "sam": lambda p, g: SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("private_generator", [False, True])
def test_resume_is_bit_identical(name, private_generator, tmp_path):
    make = FACTORIES[name]

    def gen():
        return torch.Generator().manual_seed(7) if private_generator else None

    torch.manual_seed(0)
    ref_model = make_model()
    init = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref_opt = make(ref_model.parameters(), gen())
    torch.manual_seed(1)
    train(ref_model, ref_opt, 0, 20, [0])

    torch.manual_seed(0)
    model = make_model()
    model.load_state_dict(init)
    opt = make(model.parameters(), gen())
    torch.manual_seed(1)
    counter = [0]
    train(model, opt, 0, 10, counter)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "counter": counter[0],
        },
        path,
    )
    del model, opt

    ckpt = torch.load(path, weights_only=False)
    model = make_model()
    model.load_state_dict(ckpt["model"])
    opt = make(model.parameters(), gen())
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    train(model, opt, 10, 10, [ckpt["counter"]])

    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    if name.startswith("entropy"):
        assert [g["outer_step"] for g in opt.param_groups] == [20] * len(opt.param_groups)


@pytest.mark.parametrize("name", ["entropy_sgd", "entropy_adam"])
def test_diagnostics_are_an_attribute_not_state(name):
    torch.manual_seed(0)
    model = make_model()
    opt = FACTORIES[name](model.parameters(), None)
    assert opt.diagnostics == {}
    train(model, opt, 0, 2, [0])
    assert set(opt.diagnostics) == {
        "loss",
        "gamma",
        "gammas",
        "dist_x_mu",
        "cos_angle",
        "angle_deg",
    }
    sd = opt.state_dict()
    assert "diagnostics" not in sd["state"]
    # the scoping counter is saved, with the groups (state holds parameters only)
    assert [g["outer_step"] for g in sd["param_groups"]] == [2] * len(sd["param_groups"])
    assert all(isinstance(k, int) for k in sd["state"])


def _six_steps_and_three(make):
    """A 6-step reference run, and a second run of the same start, seeds and batches
    stopped after 3: ``(reference model, model, its optimizer, batch counter)``."""
    torch.manual_seed(0)
    ref_model = make_model()
    init = copy.deepcopy(ref_model.state_dict())
    ref_opt = make(ref_model.parameters(), None)
    torch.manual_seed(1)
    train(ref_model, ref_opt, 0, 6, [0])
    model = make_model()
    model.load_state_dict(init)
    opt = make(model.parameters(), None)
    torch.manual_seed(1)
    counter = [0]
    train(model, opt, 0, 3, counter)
    return ref_model, model, opt, counter


@pytest.mark.parametrize("name", ["entropy_sgd", "entropy_adam", "entropy_sgd_flat"])
def test_state_dict_with_the_old_diagnostics_entry_loads_and_resumes_bit_identically(name):
    """State dicts written before diagnostics moved out of the state carry
    ``state["diagnostics"]``, and the scoping counter in ``state["global"]``: loading
    drops the one, moves the other into the groups, and the run continues as if
    uninterrupted."""
    make = FACTORIES[name]
    ref_model, model, opt, counter = _six_steps_and_three(make)
    old = copy.deepcopy(opt.state_dict())
    old["state"]["diagnostics"] = {"gamma": 0.03, "gammas": [0.03], "loss": torch.tensor(1.0)}
    # and the outer-step counter where those versions kept it: state["global"]
    steps = {g.pop("outer_step") for g in old["param_groups"]}
    old["state"]["global"] = {"step": steps.pop()}
    rng = torch.get_rng_state()
    saved_model = copy.deepcopy(model.state_dict())

    model = make_model()
    model.load_state_dict(saved_model)
    opt = make(model.parameters(), None)
    opt.load_state_dict(old)
    assert "diagnostics" not in opt.state and opt.diagnostics == {}
    torch.set_rng_state(rng)
    train(model, opt, 3, 3, counter)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [g["outer_step"] for g in opt.param_groups] == [6] * len(opt.param_groups)


def test_a_refused_param_group_is_not_kept():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(3))
    opt = EntropySGD([a])
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "lr": 0.5})  # the retry is not a duplicate
    assert [g["lr"] for g in opt.param_groups] == [opt.defaults["lr"], 0.5]


@pytest.mark.parametrize("name", ["entropy_sgd", "entropy_adam", "sgld", "sam"])
def test_distributed_checkpoint_state_dict_round_trip_resumes_bit_identically(name):
    """``torch.distributed.checkpoint``'s state-dict helpers (what FSDP and DCP save)
    key parameter state by parameter name and take every ``state`` key for a
    parameter: saving and loading through them resumes as an uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    make = FACTORIES[name]
    ref_model, model, opt, counter = _six_steps_and_three(make)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert all(isinstance(k, str) for k in saved["state"])  # keyed by parameter name
    rng, weights = torch.get_rng_state(), copy.deepcopy(model.state_dict())

    model = make_model()
    model.load_state_dict(weights)
    opt = make(model.parameters(), None)
    set_optimizer_state_dict(model, opt, saved)
    torch.set_rng_state(rng)
    train(model, opt, 3, 3, counter)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["entropy_sgd", "entropy_adam"])
def test_state_dict_leaves_out_the_per_step_scratch(name):
    """x, mu and the SGLD momentum are overwritten at the start of every step: a state
    dict carries only the outer rule's state (the resume tests show nothing is lost)."""
    torch.manual_seed(0)
    model = make_model()
    opt = FACTORIES[name](model.parameters(), None)
    train(model, opt, 0, 2, [0])
    assert any({"anchor", "mu"} <= set(entry) for entry in opt.state.values())
    kept = {k for entry in opt.state_dict()["state"].values() for k in entry}
    assert kept and not kept & {"anchor", "mu", "sgld_buffer"}


@pytest.mark.parametrize("name", ["entropy_sgd", "entropy_adam", "sgld", "sam"])
def test_dcp_save_and_load_into_a_fresh_optimizer_resumes_bit_identically(name, tmp_path):
    """``dcp.save``, then a fresh optimizer whose state dict ``dcp.load`` fills in place:
    the probe step DCP runs must create the state (moments, buffers, outer_step) for the
    load to have anything to fill; a no-op probe lost it without a word."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    ref_model, model, opt, counter = _six_steps_and_three(FACTORIES[name])
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    rng, weights = torch.get_rng_state(), copy.deepcopy(model.state_dict())

    model = make_model()
    model.load_state_dict(weights)
    opt = FACTORIES[name](model.parameters(), None)
    target = {"optim": get_optimizer_state_dict(model, opt)}
    assert target["optim"]["state"], "the probe step created no state to load into"
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model, opt, target["optim"])
    torch.set_rng_state(rng)
    train(model, opt, 3, 3, counter)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)

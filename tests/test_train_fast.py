"""The training fast path: on a CPU it changes nothing (bit-identical weights and logs against the loop as
it was), logs reach the host every K steps with the divergence record still exact, and each CUDA part
(fused optimizers, compile) works by the mechanism it uses, checked where a CPU can check it."""
import copy
import math

import pytest
import torch

from genbench import train as T
from genbench.config import load_card, load_suite, suite_cards
from genbench.data import Data, load
from genbench.families import get_family
from genbench.families.base import Batch, DataSpec, GenerativeModel


def reference_train(model, data, *, budget_kimg, batch_size, seed, ema_decay=None, inject_nan_at_step=None):
    """genbench.train.train as it was before the fast path (commit ae1c762), without checkpoints, cheap
    evaluations and the progress bar: float(v) of every log value at every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    state = T.TrainState()
    phases = model.phases()
    n = len(data)
    perm, pos = torch.randperm(n, generator=gen), 0
    while state.phase_index < len(phases) and state.diverged_at_kimg is None:
        phase = phases[state.phase_index]
        phase_budget = budget_kimg * phase.share
        model.start_phase(phase)
        opts = model.configure_optimizers(phase)
        model.train()
        while state.phase_kimg < phase_budget - 1e-9:
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            x = data.model_input(idx)
            y = data.y[idx] if data.y is not None else None
            logs = {k: float(v) for k, v in model.train_step(Batch(x, y), phase, opts).items()}
            if inject_nan_at_step is not None and state.steps == inject_nan_at_step:
                logs = {k: math.nan for k in logs} or {"loss": math.nan}
            state.steps += 1
            done = len(idx) / 1000.0
            state.phase_kimg += done
            state.kimg += done
            state.log.append({"kimg": round(state.kimg, 4), "phase": phase.name, **logs})
            bad = T._bad_log(logs)
            if bad is not None:
                state.diverged_at_kimg, state.diverged_reason = round(state.kimg, 4), bad
                break
            if ema is not None:
                T._ema_update(ema, model, T.ema_decay_at(ema_decay, state.steps))
        else:
            state.phase_index += 1
            state.phase_kimg = 0.0
    final = ema if ema is not None else model
    final.eval()
    return T.TrainResult(final, state)


def _cards():
    """The smoke suite's cards (its CPU sizes) and a WGAN-GP (n_critic 5: the G schedule counted on the host)."""
    cards = {c.name: c for c in suite_cards(load_suite("smoke"))}
    cards["wgan-gp"] = load_card("wgan-gp", {"params": {"g_channels": 8, "d_channels": 8}})
    return cards


CARDS = _cards()


@pytest.fixture(scope="module")
def digits():
    d = load("digits", "train", image_size=16)
    return Data(d.name, d.split, d.x[:40], d.y[:40], d.num_classes)   # 40 images: a reshuffle at step 6 of 8


def _build(card, spec):
    torch.manual_seed(0)
    return get_family(card.family)(spec, **card.params)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(CARDS))
def test_cpu_training_is_bit_identical_to_the_loop_before(name, digits):
    """Old loop vs the new one with its defaults (every CUDA part off on a CPU) and with logs moved to the
    host every 4 steps: the same weights (EMA included), buffers and logs, bit for bit. 6 steps of 8."""
    card = CARDS[name]
    kw = dict(budget_kimg=0.048, batch_size=8, seed=3, ema_decay=card.ema)
    ref = reference_train(_build(card, digits.spec), digits, **kw)
    for fast in (None, T.TrainFastPath(log_every=4)):
        new = T.train(_build(card, digits.spec), digits, progress=False, fast=fast, **kw)
        assert _same_state(ref.model, new.model), (name, fast)
        assert new.state.log == ref.state.log and new.state.steps == ref.state.steps >= 6, (name, fast)
        assert new.fast_path["bf16"] is False and new.fast_path["channels_last"] is False
        assert new.fast_path["fused_optimizers"] == [] and new.fast_path["data_on_device"] is False


class Blowup(GenerativeModel):
    """A one-parameter family whose logs are 0-d tensors (no host sync), going bad at a chosen step."""
    family = "blowup-test"

    def __init__(self, spec, bad_step: int, how: str = "nan"):
        super().__init__(spec)
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.bad_step, self.how, self.calls = bad_step, how, 0

    def configure_optimizers(self, phase):
        return {"sgd": torch.optim.SGD(self.parameters(), lr=0.1)}

    def train_step(self, batch, phase, optimizers):
        loss = (self.w - batch.x.mean()) ** 2
        optimizers["sgd"].zero_grad()
        loss.backward()
        optimizers["sgd"].step()
        bad = self.calls == self.bad_step
        self.calls += 1
        out = loss.detach()
        if bad:
            out = out * (math.inf if self.how == "inf" else math.nan) if self.how != "explode" else out + 1e9
        return {"loss": out, "w": self.w.detach().clone(), "batch": 1}

    def sample(self, rng, labels=None, **sampler):
        return torch.zeros(rng.n, 2)


@pytest.mark.parametrize("how,reason", [("nan", "loss is nan"), ("inf", "loss is inf"),
                                        ("explode", "loss exploded to 1e+09")])
def test_deferred_logs_keep_the_divergence_record_exact(how, reason):
    """A bad value in the middle of a batch of K logs: the record names its step, its kimg and its reason,
    and the log ends with its row, exactly as with a host check at every step."""
    data = Data("points", "train", torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), None, 0)
    runs = {}
    for k in (1, 4, 16):
        m = Blowup(DataSpec((2,)), bad_step=5, how=how)
        runs[k] = T.train(m, data, budget_kimg=0.16, batch_size=8, seed=0, progress=False,
                          fast=T.TrainFastPath(log_every=k))
        assert m.calls == (6 if k == 1 else 8 if k == 4 else 16)   # K=4: the flush after step 8 finds step 6
    for k, r in runs.items():
        st = r.state
        assert (st.steps, st.kimg, st.diverged_at_kimg, st.diverged_reason) == (6, 0.048, 0.048, reason), k
        assert repr(st.log) == repr(runs[1].state.log) and len(st.log) == 6, k    # repr: nan == nan
        assert r.diverged


def test_injected_nan_gives_the_same_record_with_deferred_logs(digits):
    card = CARDS["vae"]
    out = [T.train(_build(card, digits.spec), digits, budget_kimg=0.064, batch_size=8, seed=0, progress=False,
                   inject_nan_at_step=2, fast=T.TrainFastPath(log_every=k)).state for k in (1, 8)]
    assert out[0].diverged_at_kimg == out[1].diverged_at_kimg == 0.024 and out[0].steps == out[1].steps == 3
    assert repr(out[0].log) == repr(out[1].log) and out[0].diverged_reason == out[1].diverged_reason


def test_a_gan_hands_over_tensor_logs_only_while_the_loop_defers_them(digits):
    """With K > 1 the loop asks for 0-d tensors (no host sync in the GAN's step); a direct call, or K = 1,
    still gets floats, and the request is withdrawn after training."""
    seen = []
    for k in (1, 4):
        model = _build(CARDS["dcgan"], digits.spec)
        step = model.train_step

        def spy(*a, _step=step):
            logs = _step(*a)
            seen.append(type(logs["loss_d"]))
            return logs
        model.train_step = spy
        T.train(model, digits, budget_kimg=0.016, batch_size=8, seed=0, progress=False,
                fast=T.TrainFastPath(log_every=k))
        assert "tensor_logs" not in model.__dict__
    assert seen == [float, float, torch.Tensor, torch.Tensor]


def test_host_logs_are_float_of_each_value():
    rows = [{"a": 1.5, "b": torch.tensor(0.1), "c": torch.tensor(3, dtype=torch.int64)},
            {"a": torch.tensor(0.3, dtype=torch.bfloat16), "b": torch.tensor([2.5]), "c": True},
            {"d": torch.tensor(0.7, dtype=torch.float64)}]
    assert T.host_logs(rows) == [{k: float(v) for k, v in r.items()} for r in rows]
    assert T.host_logs([]) == []


def test_fast_path_describes_itself_and_is_off_on_a_cpu():
    fp = T.TrainFastPath()
    assert fp.describe("cpu") == {"bf16": False, "channels_last": False, "fused": False, "compile": "off",
                                  "log_every": 1, "data_on_device": False}
    assert fp.logs_every("cuda") == T.CUDA_LOG_EVERY and T.TrainFastPath(log_every=7).logs_every("cpu") == 7
    off = T.TrainFastPath.off()
    assert not any(v for k, v in off.describe("cpu").items() if k not in ("compile", "log_every"))
    with pytest.raises(ValueError, match="log_every"):
        T.TrainFastPath(log_every=0)


def test_fused_flag_switches_an_existing_optimizer_and_its_state():
    """set_fused is how the loop fuses a family's AdamW on CUDA; a CPU has fused kernels too, so the
    mechanism (flag read at step time, loaded `step` counters moved and cast) is checked here."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    twin = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 4)
    for i in range(4):
        if i == 2:                       # state exists: step counters on the host, as a checkpoint loads them
            T.set_fused(opt)
            assert all(g["fused"] for g in opt.param_groups)
            assert all(s["step"].dtype == torch.float32 for s in opt.state.values())
        for m, o in ((net, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert T.can_fuse(opt, "cpu") and not T.can_fuse(opt, "cuda")
    assert T.fuse_optimizers({"x": ref}, "cpu", T.TrainFastPath()) == []      # the loop fuses on CUDA only


def test_compile_reaches_every_network_and_is_undone(monkeypatch, digits):
    """--train-compile compiles each network of the model for the training steps (timed: first_step_s) and
    hands back an uncompiled model; torch.compile itself is stubbed (a CPU compile takes minutes)."""
    calls = []

    def fake_compile(self, **kw):
        calls.append((type(self).__name__, kw))
        self._compiled_call_impl = self._call_impl
    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    model = _build(CARDS["dcgan"], digits.spec)
    res = T.train(model, digits, budget_kimg=0.024, batch_size=8, seed=0, progress=False,
                  fast=T.TrainFastPath(compile="reduce-overhead"))
    assert calls == [("ConvG", {"dynamic": False, "mode": "reduce-overhead"}),
                     ("ConvD", {"dynamic": False, "mode": "reduce-overhead"})]
    assert res.fast_path["compiled"] == ["G", "D"] and len(res.fast_path["first_step_s"]) == 1
    assert model.G._compiled_call_impl is None and model.D._compiled_call_impl is None
    ref = T.train(_build(CARDS["dcgan"], digits.spec), digits, budget_kimg=0.024, batch_size=8, seed=0,
                  progress=False)
    assert _same_state(res.model, ref.model)


def test_device_data_stays_put_on_a_cpu_and_batches_follow_the_data(digits):
    same, moved = T.device_data(digits, "cpu", T.TrainFastPath())
    assert same is digits and moved is False
    b = T.Batcher(digits, 16, torch.Generator().manual_seed(0), "cpu")
    first = b.next()
    assert first.x.shape == (16, 1, 16, 16) and first.y.shape == (16,) and b.pos == 16
    b.next()              # 40 rows: the third batch reshuffles
    assert b.pos == 32
    b.next()
    assert b.pos == 16

"""The fast path's switches: off on CPU unless bf16 is asked for there explicitly."""
import torch

from genbench.fastpath import FastPath, autocast


def _matmul_dtype(fp: FastPath) -> torch.dtype:
    a = torch.randn(4, 4)
    with autocast("cpu", fp):
        return (a @ a).dtype


def test_cpu_stays_fp32_by_default_and_bf16_only_when_asked():
    assert _matmul_dtype(FastPath()) == torch.float32
    assert FastPath().describe("cpu") == {"bf16": False, "channels_last": False, "compile": "off"}
    on = FastPath(bf16=True, bf16_cpu=True)
    assert _matmul_dtype(on) == torch.bfloat16 and on.describe("cpu")["bf16"] is True
    assert _matmul_dtype(FastPath(bf16=False, bf16_cpu=True)) == torch.float32


def test_compile_modes_reach_torch_compile(monkeypatch):
    """Each compile mode compiles every network of the model with static shapes; "tuned" is CUDA graphs
    plus inductor's coordinate-descent tuning, passed as options (torch.compile takes mode or options)."""
    import pytest

    from genbench.fastpath import prepare

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    model = torch.nn.Module()
    model.net, model.head, model.empty = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Identity()
    prepare(model, "cpu", FastPath(compile="reduce-overhead"))
    assert calls == [{"dynamic": False, "mode": "reduce-overhead"}] * 2      # the parameter-free child is skipped
    calls.clear()
    prepare(model, "cpu", FastPath(compile="tuned"))
    assert calls == [{"dynamic": False, "options": {"triton.cudagraphs": True,
                                                    "coordinate_descent_tuning": True}}] * 2
    with pytest.raises(ValueError, match="compile mode"):
        prepare(model, "cpu", FastPath(compile="fastest"))

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

"""bitsandbytes' blockwise 8-bit quantizer against torchao's ``OptimState8bit`` for Adam's moments
(measured, then chosen), on the CPU: round-trip time, round-trip error, bytes held,
and whether each works under ``FakeTensorMode`` (what ``fullrank memory`` traces) and survives
``torch.save``/``torch.load(weights_only=True)`` (what a checkpoint needs).

    PYTHONPATH=src python bench/lowbit_states.py     # writes bench/results/lowbit_states.json
"""
from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

import torch

SHAPE = (4096, 1024)  # a 1024-rank moment of a LLaMA-7B MLP matrix's right projection, roughly
REPS = 5


def _time(fn) -> float:
    samples = []
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bitsandbytes_row(x: torch.Tensor) -> dict:
    import bitsandbytes.functional as F

    code = F.create_dynamic_map(signed=True)
    quantized, state = F.quantize_blockwise(x, code=code, blocksize=256)
    back = F.dequantize_blockwise(quantized, absmax=state.absmax, code=code, blocksize=256)
    row = dict(quantize_ms=1e3 * _time(lambda: F.quantize_blockwise(x, code=code, blocksize=256)),
               dequantize_ms=1e3 * _time(lambda: F.dequantize_blockwise(quantized, absmax=state.absmax, code=code,
                                                                        blocksize=256)),
               max_abs_error=float((back - x).abs().max()), rel_error=float((back - x).norm() / x.norm()),
               bytes=quantized.numel() * quantized.element_size() + state.absmax.numel() * 4)
    buffer = io.BytesIO()
    torch.save({"q": quantized, "absmax": state.absmax}, buffer)
    buffer.seek(0)
    row["weights_only_load"] = bool(torch.load(buffer, weights_only=True)["q"].dtype == torch.uint8)
    return row


def torchao_row(x: torch.Tensor) -> dict:
    from torchao.optim.subclass_8bit import OptimState8bit

    state = OptimState8bit.zeros(x.shape, signed=True, block_size=256)
    state.copy_(x)
    back = state.dequantize()
    row = dict(quantize_ms=1e3 * _time(lambda: state.copy_(x)), dequantize_ms=1e3 * _time(state.dequantize),
               max_abs_error=float((back - x).abs().max()), rel_error=float((back - x).norm() / x.norm()),
               bytes=state.codes.numel() * state.codes.element_size() + state.scale.numel() * state.scale.element_size()
               + state.qmap.numel() * state.qmap.element_size())
    buffer = io.BytesIO()
    torch.save({"m": state}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
        row["weights_only_load"] = True
    except Exception as err:  # noqa: BLE001 (the answer is the finding)
        row["weights_only_load"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def fake_ok(make) -> bool | str:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            make(torch.randn(*SHAPE))
        return True
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def main() -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(*SHAPE) * 1e-3
    result = {"shape": list(SHAPE), "threads": 1, "fp32_bytes": x.numel() * 4}
    result["bitsandbytes"] = bitsandbytes_row(x)
    try:
        result["torchao"] = torchao_row(x)
    except ImportError as err:
        raise SystemExit(f"torchao is not installed (pip install torchao): {err}") from None
    result["torchao"]["fake_tensor_mode"] = fake_ok(
        lambda t: __import__("torchao.optim.subclass_8bit", fromlist=["OptimState8bit"]).OptimState8bit.zeros(
            t.shape, signed=True, block_size=256).copy_(t))
    for name in ("bitsandbytes", "torchao"):
        print(name, json.dumps(result[name]))
    out = Path(__file__).resolve().parent / "results" / "lowbit_states.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

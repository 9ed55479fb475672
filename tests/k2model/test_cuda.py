"""What only a CUDA GPU can show (marked ``cuda``; skipped without one; ``benchmarks/gpu_check.sh tests``
runs them on the lent device): the model in bf16 autocast against fp32, the router in fp32 under
autocast, Newton-Schulz on the GPU against the CPU reference, and NCCL refusing what gloo would take."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from k2model.config import preset_config
from k2model.distributed import CollectiveError, collective_device
from k2model.model import build_model
from k2model.optim import newton_schulz

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_autocast_on_cuda_is_close_to_fp32_and_gradients_stay_fp32():
    model = build_model(preset_config("tiny"), seed=0).cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        reference = model(ids[:, :-1], ids[:, 1:]).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    torch.testing.assert_close(out.loss.float(), reference, rtol=1e-2, atol=0)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_router_scores_are_fp32_under_cuda_autocast():
    model = build_model(preset_config("tiny"), seed=0).cuda()
    router = next(m for m in model.modules() if type(m).__name__ == "Router")
    x = torch.randn(128, model.cfg.hidden_size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ids, weights, scores = router(x)
    assert scores.dtype == weights.dtype == torch.float32
    ref_ids, _, ref_scores = router(x)
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_newton_schulz_on_cuda_matches_the_cpu_reference(dtype, tol):
    G = torch.randn(6, 256, 128, generator=torch.Generator().manual_seed(0))
    cpu = newton_schulz(G, dtype=torch.float32)
    gpu = newton_schulz(G.cuda(), dtype=dtype).float().cpu()
    assert (gpu - cpu).abs().max() < tol


def test_nccl_refuses_a_cpu_tensor_and_control_values_travel_on_the_gpu():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    from k2model.distributed import _check

    try:
        assert collective_device().type == "cuda"
        # One rank reduces nothing, so the device check is called directly, as each collective calls it.
        with pytest.raises(CollectiveError, match="takes only cuda tensors"):
            _check("all_reduce", "validation loss", None, torch.zeros(2))
        _check("all_reduce", "validation loss", None, torch.zeros(2, device="cuda"))  # accepted
    finally:
        dist.destroy_process_group()


def test_a_muonclip_step_on_cuda_matches_the_cpu_reference():
    """The same gradients, one MuonClip step (Newton-Schulz in fp32) on the CPU and on the GPU: the
    parameters agree to fp32 rounding (TF32 stays off for fp32 matmuls)."""
    from k2model.config import OptimizerConfig
    from k2model.optim import build_optimizer

    cfg = preset_config("tiny")
    cpu, gpu = build_model(cfg, seed=0), build_model(cfg, seed=0).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    cpu(ids[:, :-1], ids[:, 1:]).loss.backward()
    gpu(ids[:, :-1].cuda(), ids[:, 1:].cuda()).loss.backward()
    opt_cfg = OptimizerConfig(ns_dtype="float32")
    for model in (cpu, gpu):
        build_optimizer(model, opt_cfg, 3e-3, distributed=False).step()
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert (a - b.detach().cpu()).abs().max() < 1e-5, name


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_an_offloaded_optimizer_keeps_its_state_in_pinned_host_memory_and_steps_alike(param_dtype):
    """``train.offload_optimizer``: momenta, moments and masters in pinned host memory, each piece copied to
    the GPU for its update and back; three steps give the very parameters of the optimizer that keeps its
    state on the GPU."""
    from k2model.config import OptimizerConfig
    from k2model.optim import build_optimizer

    cfg = preset_config("tiny")
    models = [build_model(cfg, seed=0, device="cuda", param_dtype=param_dtype) for _ in range(2)]
    opts = [build_optimizer(m, OptimizerConfig(ns_dtype="float32"), 3e-3, distributed=False, offload=offload)
            for m, offload in zip(models, (False, True))]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in models[0].named_parameters()}
        for model in models:
            for n, p in model.named_parameters():
                if p.dtype == torch.float32:
                    p.grad = grads[n].cuda()
                else:
                    p.main_grad = grads[n].cuda()
        for opt in opts:
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
    kept = [t for s in opts[1].state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert kept and all(t.device.type == "cpu" and t.is_pinned() for t in kept)

"""MuonClip's optimizer half: Muon for hidden matrices and AdamW for everything else, in one optimizer,
single-process or data-parallel (shared/REFERENCE.md sections 3-4; QK-Clip is k2model.qk_clip).

Muon (per matrix W with gradient G, momentum M):
- M = mu*M + G; Nesterov input U = G + mu*M (or U = M without Nesterov); mu = 0.95.
- O = NS(U): 5 quintic Newton-Schulz steps with (a, b, c) = (3.4445, -4.7750, 2.0315) (``newton_schulz``);
  a tall matrix is orthogonalised as its transpose. The iteration runs in bf16 (the published recipe)
  where the hardware multiplies bf16 natively, else in fp32 (``ns_dtype='auto'``, see ``resolve_ns_dtype``).
- update = rms_scale * sqrt(max(rows, cols)) * O with rms_scale = 0.2 (Moonlight's update-RMS matching,
  so one learning rate and one weight decay serve Muon and AdamW alike).
- W = W - lr * (update + wd * W) (decoupled weight decay).
AdamW (betas 0.9/0.95, eps 1e-8, bias-corrected, same decoupled decay) takes the token embedding, the
output head, norms and every other 1-D parameter; ``split_params`` routes by name (see OptimizerConfig).

Layout:
- Stacked experts ``[E, out, in]`` are E matrices, each orthogonalised on its own ``[out, in]`` slice.
- All matrices of one shape, taken in their wide orientation (a ``[128, 64]`` down-projection joins the
  ``[64, 128]`` gate/up projections), are orthogonalised as ONE batched bmm chain per step.
- Momentum and AdamW moments are kept in fp32 whatever the parameter dtype; updates are computed in fp32.

Distributed Muon (data parallel; our scheme, not Moonlight's ZeRO-1):
- Every replicated Muon parameter (identical on all ranks of ``process_group``, its gradient already
  averaged by the trainer) has ONE owner, assigned once by ``assign_owners``: greedy largest-first by
  Newton-Schulz FLOPs onto the least-loaded rank. Only the owner keeps its momentum and runs its
  Newton-Schulz; after the step each owner broadcasts its updated parameters (one flat buffer per owner
  and dtype) and the other ranks copy them in. A rank thus does ~1/N of the orthogonalisation and holds
  ~1/N of the Muon momentum, and every replica ends bit-identical to the owner.
- Why not ZeRO-1 (reduce-scatter the gradients, momentum on a flat 1/N shard, all-gather full matrices
  before Newton-Schulz, keep the local part): Newton-Schulz needs whole matrices, so ZeRO-1 gathers every
  momentum matrix to every rank and repeats the full orthogonalisation N times; owning whole matrices does
  each orthogonalisation once, for one broadcast of the parameters, with plain collectives. The cost is a
  coarser balance (whole matrices, not flat shards), good when matrices are many and similar, as here.
  The trainer may still all-reduce gradients as usual; a reduce to the owner would halve that traffic for
  Muon matrices (not done).
- Parameters marked rank-local (``rank_local``: routed experts under expert parallelism, whose slices
  differ between ranks) are updated on their own rank with no communication. If several data-parallel
  replicas hold the same expert shard, each repeats that work: it is identical on all of them.
- AdamW parameters are replicated: every rank updates them identically (cheap, elementwise).
- The result equals the single-process optimizer: the same arithmetic on the same matrices; only the
  batch that Newton-Schulz stacks a matrix into differs.

Checkpoints: ``state_dict()`` is keyed by parameter NAME and holds this rank's state only (its owned and
local Muon momenta plus all AdamW moments), so each rank saves its own shard; loading the shard into the
same layout continues bit-for-bit. ``merge_state_dicts`` joins the shards of all ranks into one state that
loads into any data-parallel size (expert stacks must keep their shapes); a state in the same merged form
with only this rank's entries, expert stacks re-cut, loads into any layout (``pipelines.train.reshard`` builds it
from a checkpoint's shards).

Tensor name suffixes: K stacked matrices, M rows, N columns (of the wide orientation, M <= N).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from k2model.config import OptimizerConfig
from k2model.distributed import agree, broadcast_async

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_CHUNK_BYTES_CPU = 1 << 20
"""On CPU, Newton-Schulz iterates a stack in sub-stacks of about this many bytes (see ``newton_schulz``):
small enough that a sub-stack's iterate, its Gram matrices and the work buffer stay in the cores' caches
through the chain. Chosen by measurement against 8 MiB and 512 KiB sub-stacks; see
benchmarks/results/optimizer.md."""
NS_CHUNK_BYTES_OTHER = 8 << 20
"""Sub-stack size on other devices (GPUs): it bounds the work buffers; not tuned on a GPU yet."""
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
"""/proc/cpuinfo flags of CPUs with bf16 matrix instructions: x86 AMX and AVX512-BF16, Arm's BF16."""
STATE_FORMAT = "k2pipe.muonclip/1"

NamedParams = Sequence[tuple[str, torch.Tensor]]


# ---------------------------------------------------------------------- Newton-Schulz
@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  chunk_bytes: int | None = None) -> torch.Tensor:
    """Approximately orthogonalise one matrix ``[m, n]`` or every matrix of a stack ``[..., m, n]``.

    Each matrix is scaled by its own Frobenius norm (so its spectral norm is at most 1), then ``steps``
    quintic iterations X <- (a I + b A + c A^2) X with A = X X^T run in ``dtype``; a stack is one batched
    matmul chain. Tall matrices are iterated as their transpose (the smaller Gram matrix) and transposed
    back. Returns ``dtype``, same shape as ``G``; the singular values land in roughly [0.7, 1.2].

    A stack larger than ``chunk_bytes`` (its iterate in ``dtype``; default ``ns_chunk_bytes(G.device)``)
    runs as consecutive sub-stacks of that size through the same work buffers: each sub-stack is still one
    batched chain, but its iterates stay in cache between the products, and no per-call buffer as large as
    the whole stack is touched. Each matrix goes through the same arithmetic either way (bit-for-bit the
    same result on the CPUs this was developed on; tests/k2model/test_optim.py).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT if tall else G
    out_shape = X.shape
    G_KMN = X.reshape(-1, X.shape[-2], X.shape[-1])
    K, M, N = G_KMN.shape
    out_KMN = torch.empty(K, M, N, dtype=dtype, device=G.device)
    if chunk_bytes is None:
        chunk_bytes = ns_chunk_bytes(G.device)
    per_chunk = ns_sub_stack_size(K, M, N, dtype, chunk_bytes)
    # In fp32 and wider, a X + (b A + c A^2) X runs as one product (a I + b A + c A^2) X: adding a to the
    # diagonal is an [m]-sized step where baddbmm's beta = a rescales and adds the whole [m, n] iterate.
    # Not in bf16: there the sum a + (b A + c A^2)_ii is rounded to 8 bits before it multiplies, which
    # made the iterate's error against a float64 chain clearly worse. Both chosen by measurement; see
    # benchmarks/results/optimizer.md.
    fold_a = torch.finfo(dtype).bits >= 32
    # Work buffers, reused by every chunk: fresh multi-MB results each iteration cost page faults (a large
    # share of a large stack's time on CPU, by measurement: benchmarks/results/optimizer.md); the
    # arithmetic is the same.
    work_KMN = torch.empty(per_chunk, M, N, dtype=dtype, device=G.device)
    A_KMM = torch.empty(per_chunk, M, M, dtype=dtype, device=G.device)
    B_KMM = torch.empty_like(A_KMM)
    for start in range(0, K, per_chunk):
        k = min(per_chunk, K - start)
        # Contiguous fp32 before the norm: the same values then give the same bits whatever the input's
        # layout (a transposed view sums in another order), and the scaling loses no bf16 bits.
        g_KMN = G_KMN[start:start + k].float().contiguous()
        norm_K11 = torch.linalg.vector_norm(g_KMN, dim=(-2, -1), keepdim=True).add_(NS_EPS)
        # The iterate alternates between the chunk's slice of the output and the work buffer; with an
        # odd number of steps it starts in the work buffer so that it ends in the output.
        x_KMN, next_KMN = out_KMN[start:start + k], work_KMN[:k]
        if steps % 2:
            x_KMN, next_KMN = next_KMN, x_KMN
        torch.div(g_KMN, norm_K11, out=x_KMN)
        gram_KMM, poly_KMM = A_KMM[:k], B_KMM[:k]
        poly_diag_KM = poly_KMM.diagonal(dim1=-2, dim2=-1)
        for _ in range(steps):
            torch.bmm(x_KMN, x_KMN.mT, out=gram_KMM)
            torch.baddbmm(gram_KMM, gram_KMM, gram_KMM, beta=b, alpha=c, out=poly_KMM)
            if fold_a:
                poly_diag_KM.add_(a)
                torch.bmm(poly_KMM, x_KMN, out=next_KMN)
            else:
                torch.baddbmm(x_KMN, poly_KMM, x_KMN, beta=a, out=next_KMN)
            x_KMN, next_KMN = next_KMN, x_KMN
    X = out_KMN.reshape(out_shape)
    return X.mT if tall else X


def ns_chunk_bytes(device: torch.device | str) -> int:
    """Default Newton-Schulz sub-stack size in bytes on ``device``."""
    return NS_CHUNK_BYTES_CPU if torch.device(device).type == "cpu" else NS_CHUNK_BYTES_OTHER


def ns_sub_stack_size(num_matrices: int, rows: int, cols: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Matrices per sub-stack when ``newton_schulz`` iterates ``num_matrices`` [rows, cols] matrices in
    ``dtype`` in sub-stacks of ``chunk_bytes`` (at least one matrix, at most all of them)."""
    return max(1, min(num_matrices, chunk_bytes // (rows * cols * dtype.itemsize)))


CPU_KIND_ENV = "K2PIPE_CPU_KIND"
"""Set to a key of ``SIMULATED_CPU_KINDS`` to make ``ns_dtype='auto'`` resolve as on that kind of CPU (the
tests' ``--cpu-kind`` option); explicit dtypes are never affected."""
SIMULATED_CPU_KINDS = {"amx": frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}),
                       "avx2": frozenset({"avx2", "fma"})}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (``flags`` on x86, ``Features`` on Arm); empty elsewhere.
    Under ``K2PIPE_CPU_KIND`` the flags of the simulated kind instead."""
    simulated = os.environ.get(CPU_KIND_ENV)
    if simulated:
        if simulated not in SIMULATED_CPU_KINDS:
            raise ValueError(f"{CPU_KIND_ENV}={simulated!r}: expected one of {sorted(SIMULATED_CPU_KINDS)}")
        return SIMULATED_CPU_KINDS[simulated]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_flags() -> frozenset[str]:
    """The bf16 matrix-instruction flags this CPU lists (or the simulated kind's)."""
    return _cpu_flags() & _BF16_CPU_FLAGS


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 support, or a CPU whose
    flags list AMX-BF16, AVX512-BF16 or Arm's BF16. Without them torch still computes bf16 products (same
    rounding), but by conversion, which on an AVX2-only CPU is far slower than fp32 at Newton-Schulz's
    shapes (measured: benchmarks/results/optimizer.md), so bf16 would buy nothing but time."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(_cpu_flags() & _BF16_CPU_FLAGS)


def resolve_ns_dtype(name: str, device: torch.device | str) -> str:
    """The Newton-Schulz dtype that ``optimizer.ns_dtype=name`` means on ``device``: ``auto`` is
    ``bfloat16`` where ``native_bf16_matmul`` holds (the published recipe, and the fast path there) and
    ``float32`` elsewhere (more exact, and faster there); any other name is itself."""
    if name == "auto":
        return "bfloat16" if native_bf16_matmul(device) else "float32"
    if name not in NS_DTYPES:
        raise ValueError(f"optimizer.ns_dtype={name!r}: must be 'auto' or one of {sorted(NS_DTYPES)}")
    return name


def newton_schulz_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Matmul FLOPs of ``newton_schulz`` on one ``[rows, cols]`` matrix. With m = min, n = max, each step
    does X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n); elementwise work is ignored."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m * m * m)


def _matrix_shape(p: torch.Tensor) -> tuple[int, int, int]:
    """(number of matrices, rows, cols) of a Muon parameter ``[..., rows, cols]``."""
    rows, cols = p.shape[-2], p.shape[-1]
    return p.numel() // (rows * cols), rows, cols


def muon_flops(p: torch.Tensor, steps: int = 5) -> int:
    """Newton-Schulz FLOPs of one Muon step of parameter ``p`` (all its stacked matrices)."""
    k, rows, cols = _matrix_shape(p)
    return k * newton_schulz_flops(rows, cols, steps)


# ---------------------------------------------------------------------- parameter routing
def is_local_expert(name: str) -> bool:
    """Routed-expert stacks, which are rank-local under expert parallelism (pass as ``rank_local``)."""
    return ".mlp.experts." in name


def split_params(model: nn.Module, opt_cfg: OptimizerConfig) -> tuple[list[tuple[str, nn.Parameter]],
                                                                    list[tuple[str, nn.Parameter]]]:
    """(Muon, AdamW) named parameters. Muon takes every trainable parameter with >= 2 dims, except names
    containing a ``muon_exclude`` substring and, unless ``router_on_muon``, the router matrices; everything
    goes to AdamW under ``opt_cfg.name == 'adamw'``."""
    from k2model.moe import Router  # local import: the optimizer also serves models without MoE

    router_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Router)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        on_muon = (opt_cfg.name == "muonclip" and p.ndim >= 2
                   and not any(s in name for s in opt_cfg.muon_exclude)
                   and (opt_cfg.router_on_muon or name not in router_names))
        (muon if on_muon else adamw).append((name, p))
    return muon, adamw


def assign_owners(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """Owner rank of each item: greedy largest-first onto the least-loaded rank (ties: lower rank; items
    of equal cost in name order), so every rank computes the same answer."""
    load = [0.0] * world_size
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


# ---------------------------------------------------------------------- the optimizer
class MuonClip(torch.optim.Optimizer):
    """Muon on ``muon_params`` and AdamW on ``adamw_params`` (see the module docstring).

    ``muon_params`` / ``adamw_params``: (name, parameter) pairs; names key the state dict.
    ``distributed``: own each replicated Muon matrix on one rank of ``process_group`` (default WORLD);
    None means "when torch.distributed is initialised with more than one rank".
    ``rank_local``: names (or a predicate on names) of Muon parameters that differ between ranks
    (expert-parallel shards); they are never owned or broadcast.

    Param groups carry ``lr`` (set it each step, e.g. ``k2model.schedule.set_lr``) and ``kind``
    (``muon`` or ``adamw``). With no Muon parameters this is plain AdamW (the baseline).
    """

    def __init__(self, muon_params: NamedParams, adamw_params: NamedParams, lr: float,
                 cfg: OptimizerConfig | None = None, *, distributed: bool | None = None,
                 process_group: dist.ProcessGroup | None = None,
                 rank_local: Collection[str] | Callable[[str], bool] | None = None):
        cfg = cfg or OptimizerConfig()
        self.cfg = cfg
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        names = [n for n, _ in muon_params + adamw_params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        for name, p in muon_params:
            if p.ndim < 2:
                raise ValueError(f"Muon parameter {name!r} has shape {tuple(p.shape)}; Muon needs >= 2 dims")
        if distributed is None:
            distributed = (dist.is_available() and dist.is_initialized()
                           and dist.get_world_size(process_group) > 1)
        groups = []
        if muon_params:
            ns_dtype = self._agreed_ns_dtype(cfg.ns_dtype, muon_params[0][1].device, distributed, process_group)
            groups.append(dict(
                params=[p for _, p in muon_params], names=[n for n, _ in muon_params], kind="muon", lr=lr,
                weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                ns_steps=cfg.ns_steps, ns_dtype=ns_dtype, rms_scale=cfg.rms_scale))
        if adamw_params:
            groups.append(dict(
                params=[p for _, p in adamw_params], names=[n for n, _ in adamw_params], kind="adamw", lr=lr,
                weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps))
        if not groups:
            raise ValueError("MuonClip got no parameters")
        super().__init__(groups, {})

        self.process_group = process_group
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        if callable(rank_local):
            is_local = rank_local
        else:
            local_set = set(rank_local or ())
            is_local = local_set.__contains__
        self.owner_of: dict[str, int | None] = {}
        """Owning rank (in ``process_group``) of each Muon parameter; None for rank-local ones."""
        costs = {}
        for name, p in muon_params:
            if is_local(name):
                self.owner_of[name] = None
            else:
                costs[name] = muon_flops(p, cfg.ns_steps)
        self.owner_of.update(assign_owners(costs, self.world_size))
        self._param_names = {p: n for n, p in muon_params + adamw_params}
        self.last_step_stats: dict[str, float] = {}
        """This rank's Newton-Schulz work in the last step: ``ns_matrices``, ``ns_flops``, ``ns_batches``."""

    @staticmethod
    def _agreed_ns_dtype(name: str, device: torch.device, distributed: bool,
                         process_group: dist.ProcessGroup | None) -> str:
        """``resolve_ns_dtype`` on this rank; under ``auto`` and ``distributed``, bf16 only if every rank of
        ``process_group`` multiplies bf16 natively: replicas of one expert shard on different hardware would
        otherwise orthogonalise in different dtypes and drift apart."""
        resolved = resolve_ns_dtype(name, device)
        if name != "auto" or not distributed:
            return resolved
        everywhere = agree(int(resolved == "bfloat16"), dist.ReduceOp.MIN, process_group, name="ns_dtype")
        return "bfloat16" if everywhere else "float32"

    # ------------------------------------------------------------------ queries
    @property
    def ns_dtype(self) -> str | None:
        """The dtype Newton-Schulz runs in (``auto`` resolved; a checkpoint's value after loading it)."""
        return next((g["ns_dtype"] for g in self.param_groups if g["kind"] == "muon"), None)

    def computes_here(self, name: str) -> bool:
        owner = self.owner_of.get(name)
        return owner is None or owner == self.rank

    def momentum_numel(self) -> int:
        """Muon momentum elements held by this rank."""
        return sum(s["momentum"].numel() for s in self.state.values() if "momentum" in s)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats = dict(ns_matrices=0, ns_flops=0, ns_batches=0)
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group, stats)
            else:
                self._adamw_step(group)
        if self.world_size > 1:
            self._broadcast_owned()
        self.last_step_stats = stats
        return loss

    def _muon_step(self, group: dict[str, Any], stats: dict[str, int]) -> None:
        mu, nesterov = group["momentum"], group["nesterov"]
        # Same-shape matrices (wide orientation) from the whole model, orthogonalised as one stack: per wide
        # shape (m, n), each parameter with its gradient, momentum and (matrices, rows, cols).
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   tuple[int, int, int]]]] = {}
        for p, name in zip(group["params"], group["names"]):
            if p.grad is None or not self.computes_here(name):
                continue
            g = p.grad.float()
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = _fp32_zeros_like(p)
            M = state["momentum"]
            M.mul_(mu).add_(g)
            shape = _matrix_shape(p)
            by_shape.setdefault((min(shape[1:]), max(shape[1:])), []).append((p, g, M, shape))

        ns_dtype, steps = NS_DTYPES[group["ns_dtype"]], group["ns_steps"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        for (m, n), items in by_shape.items():
            # The Nesterov update g + mu M is written straight into its slot of the stack (transposed for
            # tall matrices): no per-parameter temporary and no concatenation pass.
            stack_KMN = torch.empty(sum(shape[0] for *_, shape in items), m, n, dtype=torch.float32,
                                    device=items[0][0].device)
            start = 0
            for _, g, M, (k, rows, cols) in items:
                slot = stack_KMN[start:start + k]
                slot_KRC = slot.mT if rows > cols else slot
                if nesterov:
                    torch.add(g.reshape(k, rows, cols), M.view(k, rows, cols), alpha=mu, out=slot_KRC)
                else:
                    slot_KRC.copy_(M.view(k, rows, cols))
                start += k
            ortho_KMN = newton_schulz(stack_KMN, steps, ns_dtype)
            stats["ns_matrices"] += stack_KMN.shape[0]
            stats["ns_flops"] += stack_KMN.shape[0] * newton_schulz_flops(m, n, steps)
            stats["ns_batches"] += 1
            scale = group["rms_scale"] * math.sqrt(n)
            start = 0
            for p, _, _, (k, rows, cols) in items:
                o_KMN = ortho_KMN[start:start + k]
                start += k
                o_KRC = o_KMN.mT if rows > cols else o_KMN
                _apply_decoupled(p, o_KRC.view(p.shape), lr, weight_decay, scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.float()
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = _fp32_zeros_like(p)
                state["exp_avg_sq"] = _fp32_zeros_like(p)
            state["step"] += 1
            t = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            _apply_decoupled(p, exp_avg.div(denom), group["lr"], group["weight_decay"], 1 / (1 - beta1**t))

    def _broadcast_owned(self) -> None:
        """Every owner sends its replicated Muon parameters, one flat buffer per (owner, dtype)."""
        buckets: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        for group in self.param_groups:
            if group["kind"] != "muon":
                continue
            for p, name in zip(group["params"], group["names"]):
                owner = self.owner_of[name]
                if owner is not None:
                    buckets.setdefault((owner, p.dtype), []).append(p)
        pending = []
        for (owner, dtype), params in buckets.items():
            if owner == self.rank:
                flat = torch.cat([p.reshape(-1) for p in params])
            else:
                flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            work = broadcast_async(flat, owner, self.process_group, name=f"Muon parameters of rank {owner}")
            pending.append((owner, params, flat, work))
        for owner, params, flat, work in pending:
            work.wait()
            if owner != self.rank:
                offset = 0
                for p in params:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    # ------------------------------------------------------------------ checkpoint state
    def _owners_for_state(self) -> dict[str, int]:
        return {n: (-1 if o is None else o) for n, o in self.owner_of.items()}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state keyed by parameter name (tensors are references, as in torch)."""
        state = {}
        for p, s in self.state.items():
            if s:
                state[self._param_names[p]] = dict(s)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "format": STATE_FORMAT,
            "state": state,
            "param_groups": groups,
            "layout": {"world_size": self.world_size, "rank": self.rank,
                       "owners": self._owners_for_state()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a shard saved by ``state_dict`` in the same layout, or a ``merge_state_dicts`` result in
        any data-parallel layout. Tensors are copied, never aliased."""
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer state has format {state_dict.get('format')!r}, "
                             f"expected {STATE_FORMAT!r}")
        saved_groups = {g["kind"]: g for g in state_dict["param_groups"]}
        own_groups = {g["kind"]: g for g in self.param_groups}
        if set(saved_groups) != set(own_groups):
            raise ValueError(f"optimizer state has groups {sorted(saved_groups)}, this optimizer "
                             f"{sorted(own_groups)} (optimizer.name changed?)")
        for kind, group in own_groups.items():
            saved = saved_groups[kind]
            if list(saved["names"]) != list(group["names"]):
                missing = sorted(set(group["names"]) - set(saved["names"]))[:5]
                extra = sorted(set(saved["names"]) - set(group["names"]))[:5]
                raise ValueError(f"optimizer state's {kind} parameters differ from the model's: missing "
                                 f"{missing}, unexpected {extra} (first 5 of each; or a different order)")
        layout = state_dict.get("layout", {})
        same_layout = (layout.get("world_size") == self.world_size and layout.get("rank") == self.rank
                       and layout.get("owners") == self._owners_for_state())
        by_name = {n: p for p, n in self._param_names.items()}
        unknown = sorted(set(state_dict["state"]) - set(by_name))
        if unknown:
            raise ValueError(f"optimizer state holds parameters the model lacks: {unknown[:5]}")

        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for name, saved in state_dict["state"].items():
            p = by_name[name]
            if name in self.owner_of and not self.computes_here(name):
                continue  # another rank owns this matrix (merged state)
            entry = {}
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    if value.shape != p.shape:
                        raise ValueError(f"optimizer state {name}.{key} has shape {tuple(value.shape)}, the "
                                         f"parameter {tuple(p.shape)} (different expert-parallel layout?)")
                    value = value.to(device=p.device, dtype=torch.float32, copy=True)
                entry[key] = value
            new_state[p] = entry
        if not same_layout:
            # A Muon matrix this rank now computes but whose momentum is in nobody's saved shard.
            lacking = [n for n in self.owner_of if self.computes_here(n) and n not in state_dict["state"]]
            if lacking and layout.get("world_size") is not None:
                raise ValueError(f"this rank ({self.rank} of {self.world_size}) computes {lacking[:3]}... "
                                 f"whose momentum is not in this shard (saved by rank {layout.get('rank')} "
                                 f"of {layout.get('world_size')}); load a merge_state_dicts result instead")
        for kind, group in own_groups.items():
            for key, value in saved_groups[kind].items():
                if key not in ("names", "kind"):
                    group[key] = tuple(value) if key == "betas" else value
        self.state.clear()
        self.state.update(new_state)


def _fp32_zeros_like(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def _apply_decoupled(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float,
                     scale: float = 1.0) -> None:
    """W = W - lr * (scale * update + wd * W), computed in fp32 as W * (1 - lr wd) - (lr scale) update:
    two passes over W and no temporary (``update`` may be a strided view, in any float dtype)."""
    p32 = p.float()
    p32.mul_(1 - lr * weight_decay).add_(update, alpha=-lr * scale)
    if p32 is not p:
        p.copy_(p32)


def merge_state_dicts(shards: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer state from every rank's ``state_dict`` (Muon momenta are disjoint between owners;
    replicated AdamW state is taken from the first shard holding it). Loads into any data-parallel size."""
    shards = list(shards)
    if not shards:
        raise ValueError("merge_state_dicts needs at least one shard")
    merged_state: dict[str, Any] = {}
    for shard in shards:
        for name, entry in shard["state"].items():
            merged_state.setdefault(name, entry)
    return {"format": STATE_FORMAT, "state": merged_state, "param_groups": shards[0]["param_groups"],
            "layout": {"world_size": None, "rank": None, "owners": None}}


def build_optimizer(model: nn.Module, opt_cfg: OptimizerConfig, lr: float, *, distributed: bool | None = None,
                    process_group: dist.ProcessGroup | None = None,
                    rank_local: Collection[str] | Callable[[str], bool] | None = None) -> MuonClip:
    """The optimizer ``opt_cfg`` names for ``model``: MuonClip (Muon + AdamW, routed by ``split_params``)
    or, for ``adamw``, AdamW on every parameter (same class, same name-keyed checkpoint state).
    Under expert parallelism pass ``rank_local=is_local_expert``."""
    muon, adamw = split_params(model, opt_cfg)
    return MuonClip(muon, adamw, lr, opt_cfg, distributed=distributed, process_group=process_group,
                    rank_local=rank_local)

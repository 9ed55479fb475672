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
- Momentum and AdamW moments are kept in fp32 whatever the parameter dtype; updates are computed in fp32,
  into an fp32 master copy where the parameters are of another dtype (``train.param_dtype=bfloat16``).
- Bounded transients: a shape's matrices are orthogonalised in slices of at most ``MUON_SLICE_BYTES``
  of fp32 (whole Newton-Schulz sub-stacks, so each matrix's arithmetic is the same as in one stack), and
  AdamW updates ``ADAMW_CHUNK_NUMEL`` elements at a time.

Distributed: ZeRO-1 over the layout's replica groups (``k2model.zero``; Moonlight's distributed Muon,
with whole matrices kept whole):
- Every Muon matrix has one owner in its replica group (an expert stack: one run of experts per
  replica), the only rank that keeps its momentum and master and runs its Newton-Schulz; an AdamW
  parameter is cut into flat shards of its bucket, one per rank, each rank keeping the moments and master
  of its shard. A rank thus does ~1/N of the orthogonalisation and holds ~1/N of the state.
- Why whole matrices and not flat Muon shards (reduce-scatter, momentum on a flat 1/N shard, all-gather
  full matrices before Newton-Schulz, keep the local part): Newton-Schulz needs whole matrices, so flat
  shards would gather every momentum matrix to every rank and repeat the orthogonalisation N times; an
  owner does each one once, for one broadcast of the parameter. The cost is a coarser balance, good when
  matrices are many and similar, as here.
- ``update()`` reads the averaged gradient of what this rank owns (``k2model.parallel.GradientSync`` puts
  it there: reduce to the owner, reduce-scatter of the buckets); ``publish()`` broadcasts each owned
  matrix (run of experts) and all-gathers each bucket, so every replica ends bit-identical.
- The result equals the single-process optimizer: the same arithmetic on the same matrices; only the
  batch that Newton-Schulz stacks a matrix into differs.

Checkpoints: ``state_dict()`` is keyed by parameter NAME and holds this rank's state only, each entry with
its ``span``: the flat elements of the whole model's parameter it covers (expert stacks counted over every
expert). Loading the shard into the same layout continues bit-for-bit; ``merge_state_dicts`` joins every
rank's entries into whole ones, which load into any layout; ``pipelines.train.reshard`` reads from a
checkpoint exactly the spans a rank of another layout owns.

Tensor name suffixes: K stacked matrices, M rows, N columns (of the wide orientation, M <= N).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from k2model.config import OptimizerConfig
from k2model.distributed import ParallelLayout, agree, all_gather_into_, broadcast_async, is_distributed
from k2model.qk_clip import scale_weight_rows
from k2model.zero import DEFAULT_BUCKET_NUMEL, Bucket, ParamInfo, ShardPlan

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
STATE_FORMAT = "k2pipe.muonclip/2"
MUON_SLICE_BYTES = 512 << 20
"""The most bytes of fp32 matrices the Muon step stacks for one Newton-Schulz call (``muon_slice_matrices``):
a shape's matrices beyond it are orthogonalised in further slices through the same arithmetic."""
ADAMW_CHUNK_NUMEL = 1 << 22
"""Elements the AdamW step updates at once: its temporaries stay under a few of these, whatever the size of
the parameter (shard) it updates."""

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


# ---------------------------------------------------------------------- parameter routing
def is_local_expert(name: str) -> bool:
    """Routed-expert stacks: their replica group is the expert replica group (``k2model.zero``)."""
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
        (muon if on_muon(name, p.ndim, name in router_names, opt_cfg) else adamw).append((name, p))
    return muon, adamw


def on_muon(name: str, ndim: int, is_router: bool, opt_cfg: OptimizerConfig) -> bool:
    """Whether ``split_params`` gives parameter ``name`` (of ``ndim`` dims; a router matrix or not) to Muon."""
    return (opt_cfg.name == "muonclip" and ndim >= 2 and not any(s in name for s in opt_cfg.muon_exclude)
            and (opt_cfg.router_on_muon or not is_router))


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
    """Muon on ``muon_params`` and AdamW on ``adamw_params`` (see the module docstring), with ZeRO-1 over
    the replica groups of ``layout`` (``k2model.zero``).

    ``muon_params`` / ``adamw_params``: (name, parameter) pairs; names key the state dict. Routed-expert
    stacks are recognised by name (``is_local_expert``).
    ``layout``: the parallel layout (data-parallel group of the stage, expert replica groups). Without
    one, ``distributed`` (None: "when torch.distributed is initialised with more than one rank") makes
    every parameter, experts included, replicated over ``process_group`` (default WORLD).
    ``bucket_numel``: elements per AdamW bucket (``k2model.zero.DEFAULT_BUCKET_NUMEL``);
    ``slice_bytes``: the most bytes of fp32 matrices one Newton-Schulz stack holds (``MUON_SLICE_BYTES``).
    ``param_order``: every name in the model's ``named_parameters`` order (the backward produces gradients
    in about its reverse, which the gradient sync's buckets follow); default: Muon's, then AdamW's.
    ``offload``: keep the state and masters in host memory (``state_device``).

    Each step reads the gradient of what this rank owns: ``p.grad`` for fp32 parameters, ``p.main_grad``
    (fp32, ``k2model.parallel.GradientSync`` accumulates it) for parameters of another dtype, whose fp32
    master copy this optimizer keeps for the part it owns. ``step()`` is ``update()`` (the owned part:
    momenta, moments, masters, and the parameters themselves where they are fp32) then ``publish()`` (every
    rank's parameters from their owners); QK-Clip runs between the two (``scale_rows_``).

    Param groups carry ``lr`` (set it each step, e.g. ``k2model.schedule.set_lr``) and ``kind``
    (``muon`` or ``adamw``). With no Muon parameters this is plain AdamW (the baseline).
    """

    def __init__(self, muon_params: NamedParams, adamw_params: NamedParams, lr: float,
                 cfg: OptimizerConfig | None = None, *, layout: ParallelLayout | None = None,
                 distributed: bool | None = None, process_group: dist.ProcessGroup | None = None,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, slice_bytes: int | None = None,
                 param_order: Sequence[str] | None = None, offload: bool = False):
        cfg = cfg or OptimizerConfig()
        self.offload = offload
        """Keep the optimizer state and masters in host memory; the step copies each piece it updates to
        the parameters' device and back (``train.offload_optimizer``)."""
        self.cfg = cfg
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        names = [n for n, _ in muon_params + adamw_params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        for name, p in muon_params:
            if p.ndim < 2:
                raise ValueError(f"Muon parameter {name!r} has shape {tuple(p.shape)}; Muon needs >= 2 dims")
        if layout is not None:
            dp_group, expert_group = layout.dp_group, layout.expert_replica_group
            dp, dp_rank, replicas, replica_rank = replica_groups(layout)
            self.expert_offset_of = layout.ep_rank
        else:
            if distributed is None:
                distributed = is_distributed(process_group)
            dp_group = expert_group = process_group
            dp = replicas = dist.get_world_size(process_group) if distributed else 1
            dp_rank = replica_rank = dist.get_rank(process_group) if distributed else 0
            self.expert_offset_of = 0
        self.process_group, self.expert_group = dp_group, expert_group
        self.world_size, self.rank = dp, dp_rank
        groups = []
        if muon_params:
            ns_dtype = self._agreed_ns_dtype(cfg.ns_dtype, muon_params[0][1].device, dp > 1, dp_group)
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

        # The plan walks the parameters in the model's order (the order the backward reverses).
        ordered = muon_params + adamw_params
        if param_order is not None:
            position = {n: i for i, n in enumerate(param_order)}
            ordered.sort(key=lambda pair: position[pair[0]])
        self.plan = _plan_of(ordered, {n for n, _ in muon_params}, (dp, dp_rank, replicas, replica_rank),
                             bucket_numel, cfg.ns_steps)
        """Which part of each parameter this rank updates (``k2model.zero.ShardPlan``)."""
        self.slice_bytes = MUON_SLICE_BYTES if slice_bytes is None else slice_bytes
        self._param_names = {p: n for n, p in ordered}
        self._params = dict(ordered)
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

    def momentum_numel(self) -> int:
        """Muon momentum elements held by this rank."""
        return sum(s["momentum"].numel() for s in self.state.values() if "momentum" in s)

    def owned_parts(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, flat view of the owned part of the parameter, the same part of its fp32 gradient) for
        every parameter with a gradient of which this rank owns a part."""
        for name, p in self._params.items():
            span = self.plan.owned(name)
            g = grad_of(p)
            if span is not None and g is not None:
                yield name, p.view(-1)[span[0]:span[1]], g.view(-1)[span[0]:span[1]]

    def owned_grads(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, flat fp32 gradient of the part this rank owns): the gradient norm and clipping act on
        these (each element of the model is owned by exactly one rank of the world)."""
        for name, _, g in self.owned_parts():
            yield name, g

    def global_span(self, name: str) -> tuple[int, int] | None:
        """What this rank owns of parameter ``name`` as a flat element range of the whole model's tensor
        (expert stacks counted over every expert), or None: how a checkpoint's optimizer state is keyed."""
        span = self.plan.owned(name)
        if span is None:
            return None
        shift = self._expert_shift(name)
        return span[0] + shift, span[1] + shift

    def _expert_shift(self, name: str) -> int:
        info = self.plan.params[name]
        return self.expert_offset_of * info.numel if info.expert else 0

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update()
        self.publish()
        return loss

    @torch.no_grad()
    def update(self) -> None:
        """Update the part of every parameter this rank owns (its master copy where it keeps one)."""
        stats = dict(ns_matrices=0, ns_flops=0, ns_batches=0)
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_update(group, stats)
            else:
                self._adamw_update(group)
        self.last_step_stats = stats

    def _target(self, p: torch.Tensor, state: dict[str, Any], span: tuple[int, int]) -> torch.Tensor:
        """What the update writes: the fp32 master of the owned part, or the parameter's own flat part."""
        if "master" in state:
            return state["master"].view(-1)
        return p.view(-1)[span[0]:span[1]]

    def state_device(self, p: torch.Tensor) -> torch.device:
        """Where the state of ``p`` lives: host memory under ``offload`` (pinned for a GPU's copies), else
        with the parameter."""
        return torch.device("cpu") if self.offload else p.device

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], span: tuple[int, int], shape: tuple[int, ...],
                    keys: tuple[str, ...]) -> None:
        state["span"] = span
        device, pin = self.state_device(p), self.offload and p.is_cuda
        for key in keys:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device, pin_memory=pin)
        if p.dtype != torch.float32:
            master = p.detach().view(-1)[span[0]:span[1]].float().reshape(shape)
            state["master"] = master.to(device).pin_memory() if pin else master.to(device)

    def _muon_update(self, group: dict[str, Any], stats: dict[str, int]) -> None:
        mu, nesterov = group["momentum"], group["nesterov"]
        # Same-shape matrices (wide orientation) from the whole model, orthogonalised together in slices of
        # at most ``slice_bytes``: per wide shape (m, n), the owned matrices of each parameter with their
        # gradient, momentum and update target, as [k, rows, cols] views.
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for p, name in zip(group["params"], group["names"]):
            rows_range = self.plan.owned_rows(name)
            g = grad_of(p)
            if rows_range is None or g is None:
                continue
            rows, cols = p.shape[-2], p.shape[-1]
            span = self.plan.owned(name)
            k = len(rows_range)
            state = self.state[p]
            if "momentum" not in state:
                shape = tuple(p.shape) if k == self.plan.params[name].matrices else (k, rows, cols)
                self._init_state(p, state, span, shape, ("momentum",))
            g_KRC = g.view(-1)[span[0]:span[1]].view(k, rows, cols)
            target_KRC = self._target(p, state, span).view(k, rows, cols)
            by_shape.setdefault((min(rows, cols), max(rows, cols)), []).append(
                (g_KRC, state["momentum"].view(k, rows, cols), target_KRC))

        ns_dtype = NS_DTYPES[group["ns_dtype"]]
        for (m, n), items in by_shape.items():
            total = sum(g.shape[0] for g, _, _ in items)
            per_slice = muon_slice_matrices(total, m, n, ns_dtype, self.slice_bytes, items[0][0].device)
            stack_KMN = torch.empty(min(per_slice, total), m, n, dtype=torch.float32, device=items[0][0].device)
            filled, targets = 0, []
            for g_KRC, kept_M_KRC, target_KRC in items:
                # The momentum, on the gradient's device (a copy of it under offload, written back below).
                M_KRC = kept_M_KRC.to(g_KRC.device, non_blocking=True)
                M_KRC.mul_(mu).add_(g_KRC)
                start = 0
                while start < g_KRC.shape[0]:
                    take = min(g_KRC.shape[0] - start, per_slice - filled)
                    # The Nesterov input g + mu M goes straight into its slot of the stack (transposed for
                    # tall matrices): no per-parameter temporary and no concatenation pass.
                    slot = stack_KMN[filled:filled + take]
                    slot_KRC = slot.mT if g_KRC.shape[-2] > g_KRC.shape[-1] else slot
                    if nesterov:
                        torch.add(g_KRC[start:start + take], M_KRC[start:start + take], alpha=mu, out=slot_KRC)
                    else:
                        slot_KRC.copy_(M_KRC[start:start + take])
                    targets.append(target_KRC[start:start + take])
                    filled += take
                    start += take
                    if filled == per_slice:
                        self._orthogonalise_and_apply(group, stack_KMN, targets, stats)
                        filled, targets = 0, []
                if M_KRC is not kept_M_KRC:
                    kept_M_KRC.copy_(M_KRC)
            if filled:
                self._orthogonalise_and_apply(group, stack_KMN[:filled], targets, stats)

    @staticmethod
    def _orthogonalise_and_apply(group: dict[str, Any], stack_KMN: torch.Tensor, targets: list[torch.Tensor],
                                 stats: dict[str, int]) -> None:
        """Newton-Schulz of one slice of Nesterov inputs, and each matrix's update into its target (the
        targets' matrices, in stack order)."""
        K, m, n = stack_KMN.shape
        steps = group["ns_steps"]
        ortho_KMN = newton_schulz(stack_KMN, steps, NS_DTYPES[group["ns_dtype"]])
        scale = group["rms_scale"] * math.sqrt(n)
        at = 0
        for target_KRC in targets:
            o_KMN = ortho_KMN[at:at + target_KRC.shape[0]]
            at += target_KRC.shape[0]
            o_KRC = o_KMN.mT if target_KRC.shape[-2] > target_KRC.shape[-1] else o_KMN
            _apply_staged(target_KRC, o_KRC, group["lr"], group["weight_decay"], scale)
        stats["ns_matrices"] += K
        stats["ns_flops"] += K * newton_schulz_flops(m, n, steps)
        stats["ns_batches"] += 1

    def _adamw_update(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        for p, name in zip(group["params"], group["names"]):
            span = self.plan.owned(name)
            g = grad_of(p)
            if span is None or g is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                self._init_state(p, state, span, (span[1] - span[0],), ("exp_avg", "exp_avg_sq"))
            state["step"] += 1
            t = state["step"]
            g_flat = g.view(-1)[span[0]:span[1]]
            target = self._target(p, state, span)
            bias2, scale = math.sqrt(1 - beta2**t), 1 / (1 - beta1**t)
            # Elementwise, in chunks: the temporaries stay under ADAMW_CHUNK_NUMEL elements whatever the
            # shard's size, and each element's arithmetic is the same.
            for lo in range(0, g_flat.numel(), ADAMW_CHUNK_NUMEL):
                hi = min(lo + ADAMW_CHUNK_NUMEL, g_flat.numel())
                kept = state["exp_avg"][lo:hi], state["exp_avg_sq"][lo:hi]
                exp_avg, exp_avg_sq = (t.to(g_flat.device, non_blocking=True) for t in kept)  # copies under offload
                exp_avg.lerp_(g_flat[lo:hi], 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g_flat[lo:hi], g_flat[lo:hi], value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias2).add_(eps)
                _apply_staged(target[lo:hi], exp_avg.div(denom), lr, weight_decay, scale)
                if exp_avg is not kept[0]:
                    kept[0].copy_(exp_avg)
                    kept[1].copy_(exp_avg_sq)

    @torch.no_grad()
    def scale_rows_(self, weight: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor) -> None:
        """``weight[rows] *= factors[:, None]`` (QK-Clip) on what this rank owns of the 2-D parameter
        ``weight``: its fp32 master where it keeps one, else the parameter itself; ``publish()`` then sends
        the result to the other ranks. Call between ``update()`` and ``publish()``."""
        name = self._param_names[weight]
        span = self.plan.owned(name)
        if span is None:
            return
        state = self.state[weight]
        cols = weight.shape[-1]
        if span == (0, weight.numel()):
            target = state["master"].view(weight.shape) if "master" in state else weight
            scale_weight_rows(target, rows.to(target.device), factors.to(target.device))
            return
        # A flat shard (AdamW) covers rows in part: scale each owned element by its row's factor (1 for rows
        # not clipped, which leaves them bit-for-bit as they are).
        flat = self._target(weight, state, span)
        factor_of_row = torch.ones(weight.shape[0], dtype=torch.float32, device=flat.device)
        factor_of_row[rows.to(flat.device)] = factors.float().to(flat.device)
        row_of = torch.arange(span[0], span[1], device=flat.device) // cols
        flat.copy_((flat.float() * factor_of_row[row_of]).to(flat.dtype))

    @torch.no_grad()
    def publish(self) -> None:
        """Every rank's parameters from their owners: the owner casts its master into the parameter
        (parameters of another dtype than fp32), then broadcasts whole Muon matrices (runs of experts)
        in place, and each AdamW bucket is all-gathered through one bucket-sized buffer at a time."""
        for p in self._params.values():
            state = self.state.get(p)
            if state and "master" in state:
                lo, hi = state["span"]
                p.view(-1)[lo:hi].copy_(state["master"].view(-1))
        plan = self.plan
        pending = []
        for name, owner in plan.muon_owner.items():
            pending.append(broadcast_async(self._params[name].data, owner, self.process_group,
                                           name=f"Muon parameter {name}"))
        for name, runs in plan.expert_runs.items():
            p = self._params[name]
            for run, owner in runs:
                if len(run):
                    pending.append(broadcast_async(p.data[run.start:run.stop], owner, self.expert_group,
                                                   name=f"experts {run.start}-{run.stop - 1} of {name}"))
        for bucket in plan.buckets:
            self._gather_bucket(bucket)
        for work in pending:
            work.wait()

    def _gather_bucket(self, bucket: Bucket) -> None:
        params = [self._params[n] for n in bucket.names]
        dtype, device = params[0].dtype, params[0].device
        rank, shard = self.plan.group_rank(bucket.expert), bucket.shard_numel
        full = torch.zeros(bucket.padded_numel, dtype=dtype, device=device)
        own = full[rank * shard:(rank + 1) * shard]
        for p, offset in zip(params, bucket.offsets):
            lo, hi = max(offset, rank * shard), min(offset + p.numel(), (rank + 1) * shard)
            if lo < hi:
                own[lo - rank * shard:hi - rank * shard].copy_(p.view(-1)[lo - offset:hi - offset])
        group = self.expert_group if bucket.expert else self.process_group
        all_gather_into_(full, own, group, name=f"AdamW bucket of {bucket.names[0]}")
        for p, offset in zip(params, bucket.offsets):
            p.view(-1).copy_(full[offset:offset + p.numel()])

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """This rank's state keyed by parameter name, each entry with its ``span`` (``global_span``)
        (tensors are references, as in torch)."""
        state = {}
        for p, s in self.state.items():
            if s:
                name = self._param_names[p]
                entry = dict(s)
                entry["span"] = list(self.global_span(name))
                state[name] = entry
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"format": STATE_FORMAT, "state": state, "param_groups": groups,
                "layout": {"dp": self.plan.dp, "dp_rank": self.plan.dp_rank, "replicas": self.plan.replicas,
                           "replica_rank": self.plan.replica_rank}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state whose entries cover what this rank owns: this rank's own ``state_dict`` (the same
        layout), a ``merge_state_dicts`` result, or what ``pipelines.train.reshard`` assembled for this rank
        of another layout. Each entry's ``span`` says which part of the parameter its tensors hold; the
        part this rank owns is cut out of it. Tensors are copied, never aliased."""
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
        unknown = sorted(set(state_dict["state"]) - set(self._params))
        if unknown:
            raise ValueError(f"optimizer state holds parameters the model lacks: {unknown[:5]}")

        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for name, saved in state_dict["state"].items():
            p = self._params[name]
            want = self.global_span(name)
            if want is None:
                continue  # another rank owns all of it (a merged state)
            have = saved.get("span")
            if have is None or not (have[0] <= want[0] and want[1] <= have[1]):
                raise ValueError(f"optimizer state of {name} covers elements {have} of the parameter; this rank "
                                 f"updates {list(want)}: load the shard of this rank's layout, a merged state or "
                                 "a resharded one")
            span = self.plan.owned(name)
            kind = "muon" if "momentum" in saved else "adamw"
            rows_range = self.plan.owned_rows(name) if kind == "muon" else None
            shape = ((span[1] - span[0],) if kind == "adamw"
                     else tuple(p.shape) if len(rows_range) == self.plan.params[name].matrices
                     else (len(rows_range), *p.shape[-2:]))
            entry: dict[str, Any] = {"span": span}
            for key, value in saved.items():
                if key == "span":
                    continue
                if isinstance(value, torch.Tensor):
                    part = value.reshape(-1)[want[0] - have[0]:want[1] - have[0]]
                    value = part.to(device=self.state_device(p), dtype=torch.float32, copy=True).reshape(shape)
                    if self.offload and p.is_cuda:
                        value = value.pin_memory()
                entry[key] = value
            if p.dtype != torch.float32 and "master" not in entry:
                raise ValueError(f"optimizer state of {name} has no fp32 master copy, but the parameter is "
                                 f"{p.dtype} (train.param_dtype changed?)")
            if p.dtype == torch.float32:
                entry.pop("master", None)
            new_state[p] = entry
        for kind, group in own_groups.items():
            for key, value in saved_groups[kind].items():
                if key not in ("names", "kind"):
                    group[key] = tuple(value) if key == "betas" else value
        self.state.clear()
        self.state.update(new_state)


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The fp32 gradient the optimizer reads: ``p.main_grad`` where the parameter keeps one (a parameter of
    another dtype, ``k2model.parallel.GradientSync``), else ``p.grad``."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def muon_slice_matrices(num_matrices: int, m: int, n: int, ns_dtype: torch.dtype, slice_bytes: int,
                        device: torch.device | str) -> int:
    """Matrices per Newton-Schulz stack of ``num_matrices`` wide [m, n] matrices: as many as
    ``slice_bytes`` of fp32 hold, rounded down to whole sub-stacks of ``newton_schulz`` (so each matrix
    meets the same sub-stack, and the same arithmetic, as in one stack of them all), at least one
    sub-stack."""
    chunk = ns_sub_stack_size(num_matrices, m, n, ns_dtype, ns_chunk_bytes(device))
    fit = slice_bytes // (m * n * 4)
    return max(chunk, fit // chunk * chunk)


def _apply_staged(target: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """``_apply_decoupled`` where the target may live in host memory (offload): a copy of it on the update's
    device is updated and written back."""
    if target.device == update.device:
        _apply_decoupled(target, update, lr, weight_decay, scale)
        return
    staged = target.to(update.device, non_blocking=True)
    _apply_decoupled(staged, update, lr, weight_decay, scale)
    target.copy_(staged)


def _apply_decoupled(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float,
                     scale: float = 1.0) -> None:
    """W = W - lr * (scale * update + wd * W), computed in fp32 as W * (1 - lr wd) - (lr scale) update:
    two passes over W and no temporary (``update`` may be a strided view, in any float dtype)."""
    p32 = p.float()
    p32.mul_(1 - lr * weight_decay).add_(update, alpha=-lr * scale)
    if p32 is not p:
        p.copy_(p32)


def merge_state_dicts(shards: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer state from every rank's ``state_dict``, each entry whole (every span of a parameter
    joined, in order): it loads into any layout of the same data-parallel stage (expert stacks are
    joined over the ranks that held them, so the ranks' expert slices must tile the stack)."""
    shards = list(shards)
    if not shards:
        raise ValueError("merge_state_dicts needs at least one shard")
    pieces: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for shard in shards:
        for name, entry in shard["state"].items():
            pieces.setdefault(name, {}).setdefault(tuple(entry["span"]), entry)
    merged_state: dict[str, Any] = {}
    for name, by_span in pieces.items():
        spans = sorted(by_span)
        for (_, hi), (lo, _) in zip(spans, spans[1:]):
            if hi != lo:
                raise ValueError(f"optimizer state of {name}: the shards' spans {spans} do not tile a range")
        first = by_span[spans[0]]
        entry = {"span": [spans[0][0], spans[-1][1]]}
        for key, value in first.items():
            if key == "span":
                continue
            if isinstance(value, torch.Tensor):
                parts = [by_span[s][key].reshape(-1) for s in spans]
                entry[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
            else:
                entry[key] = value
        merged_state[name] = entry
    return {"format": STATE_FORMAT, "state": merged_state, "param_groups": shards[0]["param_groups"],
            "layout": None}


def replica_groups(layout: ParallelLayout) -> tuple[int, int, int, int]:
    """(data-parallel size of the stage, this rank's index in it, expert replicas, this rank's index among
    them): the group sizes the optimizer's ``ShardPlan`` is made for."""
    return layout.dp_size, layout.dp_rank, layout.num_expert_replicas, layout.dp_rank // layout.ep


def _plan_of(ordered: NamedParams, muon_names: set[str], groups: tuple[int, int, int, int], bucket_numel: int,
             ns_steps: int) -> ShardPlan:
    dp, dp_rank, replicas, replica_rank = groups
    infos = [ParamInfo(n, tuple(p.shape), n in muon_names, is_local_expert(n)) for n, p in ordered]
    return ShardPlan(infos, dp=dp, dp_rank=dp_rank, replicas=replicas, replica_rank=replica_rank,
                     bucket_numel=bucket_numel, ns_steps=ns_steps)


def build_optimizer(model: nn.Module, opt_cfg: OptimizerConfig, lr: float, *, layout: ParallelLayout | None = None,
                    distributed: bool | None = None, process_group: dist.ProcessGroup | None = None,
                    **kwargs: Any) -> MuonClip:
    """The optimizer ``opt_cfg`` names for ``model``: MuonClip (Muon + AdamW, routed by ``split_params``)
    or, for ``adamw``, AdamW on every parameter (same class, same name-keyed checkpoint state), sharded
    over ``layout`` (``MuonClip``)."""
    muon, adamw = split_params(model, opt_cfg)
    return MuonClip(muon, adamw, lr, opt_cfg, layout=layout, distributed=distributed, process_group=process_group,
                    param_order=[n for n, _ in model.named_parameters()], **kwargs)

"""Resume a checkpoint in another parallel layout: another number of workers, another expert-parallel
degree, or both (a job resubmitted to a smaller or larger cluster).

The layout does not change the math: the global batch, its sample order and every formula stay; what
changes is which rank holds what, and the order of floating-point sums. So a resharded resume continues
the same run, equal to an uninterrupted one to float rounding (not bit for bit; a resume in the same
layout is bit-exact). What a rank of the new layout needs, and where it finds it in the old shards
(``pipelines.train.checkpoint_file``, each with an index, read by byte range):

- replicated parameters and buffers: the same on every old rank of the pipeline stage that held them
  (every old rank without a pipeline); read from the holder ``new_rank`` steps along, so the reads spread
  over the shards. Under a pipeline a rank reads only the names of its own stage's layers
  (``model_names``), wherever the old stages cut the layers;
- routed-expert stacks (``k2model.model.is_stacked_expert``): only the rows of the experts this rank now
  holds, from old ranks that held them (one ranged read per piece);
- optimizer state (Muon momenta, AdamW moments, fp32 masters): kept by the rank that owns each part of a
  parameter (ZeRO-1, ``k2model.zero``), each entry with its ``span`` (flat elements of the whole model's
  parameter); a rank reads, by element range, the elements it owns in the new layout (``state_span``),
  from whichever old entries hold them;
- step, counters and optimizer hyperparameters from old rank 0; RNG states from the old rank with the
  same index, else from rank 0.

Each old shard's index and skeleton are read (kilobytes); of the tensor bytes, a rank reads exactly what it
keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from k2model.distributed import ParallelLayout
from k2model.model import is_stacked_expert
from pipelines.train.checkpoint_file import ShardReader, TensorRef, fill

MODEL = "model/"
OPT_STATE = "optimizer/state/"


def _expert_rows(readers: list[ShardReader], key: str, layouts: list[ParallelLayout], num_experts: int,
                 want: range, prefer: int) -> torch.Tensor:
    """Rows ``want`` (global expert ids) of the expert-stacked tensor ``key``, gathered from the old shards
    that hold them. A shard's tensor holds all experts if its first dimension is ``num_experts`` (an
    expert stack owned whole, ep=1), else its old rank's local experts. Among shards holding the same
    rows, the one ``prefer`` steps along is read, so new ranks spread over the old replicas."""
    holders = [(range(0, num_experts) if r.tensors[key]["shape"][0] == num_experts
                else layouts[k].local_experts(num_experts), k)
               for k, r in enumerate(readers) if key in r.tensors]
    pieces, pos = [], want.start
    while pos < want.stop:
        covering = [(rows, k) for rows, k in holders if rows.start <= pos < rows.stop]
        if not covering:
            raise ValueError(f"no shard of the checkpoint holds expert {pos} of {key!r}: the checkpoint is "
                             "incomplete")
        rows, k = covering[prefer % len(covering)]
        stop = min(want.stop, rows.stop)
        pieces.append(readers[k].tensor(key, range(pos - rows.start, stop - rows.start)))
        pos = stop
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _state_span(readers: list[ShardReader], pname: str, olds: list[tuple[int, dict[str, Any]]],
                span: tuple[int, int], prefer: int) -> dict[str, Any]:
    """The optimizer state of ``pname`` over the flat elements ``span``, from the old entries ``olds`` (old
    rank, entry skeleton), read by element range. Where several old entries hold the same elements
    (replicas), the one ``prefer`` steps along is read."""
    out: dict[str, Any] = {key: value for key, value in olds[0][1].items() if not isinstance(value, TensorRef)}
    out["span"] = list(span)
    pieces: dict[str, list[torch.Tensor]] = {key: [] for key, v in olds[0][1].items() if isinstance(v, TensorRef)}
    pos = span[0]
    while pos < span[1]:
        covering = [(k, entry) for k, entry in olds if entry["span"][0] <= pos < entry["span"][1]]
        if not covering:
            raise ValueError(f"no shard of the checkpoint holds optimizer state of {pname} at element {pos}: the "
                             "checkpoint is incomplete")
        k, entry = covering[prefer % len(covering)]
        lo, hi = entry["span"]
        stop = min(span[1], hi)
        for key in pieces:
            pieces[key].append(readers[k].tensor(entry[key].key, elements=range(pos - lo, stop - lo)))
        pos = stop
    for key, parts in pieces.items():
        out[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


def load_resharded(readers: list[ShardReader], old_ep: int, rank: int, world_size: int, ep: int,
                   num_experts: int, state_span: Callable[[str], tuple[int, int] | None], *, old_pp: int = 1,
                   pp: int = 1, model_names: Collection[str] | None = None) -> dict[str, Any]:
    """The trainer state of ``rank`` in the layout (``world_size``, ``ep``, ``pp``), assembled from
    ``readers`` (the old shards, in old rank order, written by ``len(readers)`` ranks with ``old_ep`` and
    ``old_pp``). ``state_span(param_name)``: the flat elements of that parameter (of the whole model) whose
    optimizer state this rank keeps in the new layout (``MuonClip.global_span``), or None.
    ``model_names``: the state-dict names of this rank's model (its pipeline stage's); None for all."""
    old_world = len(readers)
    old_layouts = [ParallelLayout(old_world, k, old_ep, old_pp, create_groups=False) for k in range(old_world)]
    new_rows = ParallelLayout(world_size, rank, ep, pp, create_groups=False).local_experts(num_experts)
    holders: dict[str, list[int]] = {}  # model tensor name -> old ranks whose shard has it
    for k, reader in enumerate(readers):
        for key in reader.tensors:
            if key.startswith(MODEL):
                holders.setdefault(key[len(MODEL):], []).append(k)
    wanted = set(holders) if model_names is None else set(model_names)
    missing = sorted(wanted - set(holders))
    if missing:
        raise ValueError(f"no shard of the checkpoint holds {missing[:3]} ({len(missing)} tensors): the checkpoint "
                         "is incomplete or of another model")

    model: dict[str, torch.Tensor] = {}
    for name, ks in holders.items():
        if name not in wanted:
            continue
        key = MODEL + name
        model[name] = (_expert_rows(readers, key, old_layouts, num_experts, new_rows, rank)
                       if is_stacked_expert(name) else readers[ks[rank % len(ks)]].tensor(key))

    # Optimizer state: each entry says which flat elements of the whole model's parameter it holds
    # (``span``); this rank reads the elements it now owns (``state_span``), wherever they were.
    entries: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for k, reader in enumerate(readers):
        if not any(key.startswith(OPT_STATE) for key in reader.tensors):
            continue
        for pname, entry in reader.skeleton()["optimizer"]["state"].items():
            entries.setdefault(pname, []).append((k, entry))
    opt_state: dict[str, dict[str, Any]] = {}
    for pname, olds in entries.items():
        span = state_span(pname) if pname in wanted else None
        if span is not None:
            opt_state[pname] = _state_span(readers, pname, olds, span, prefer=rank)
    first = readers[0].skeleton()
    optimizer = {k: v for k, v in first["optimizer"].items() if k not in ("state", "layout")}
    # Each group's parameter names: the old stages' lists (one shard each: a stage's ranks share them)
    # joined stage after stage, so in the whole model's order, then cut to this rank's stage.
    stage_firsts = [readers[s * (old_world // old_pp)] for s in range(old_pp)]
    groups = []
    for group in first["optimizer"]["param_groups"]:
        names: dict[str, None] = {}
        for reader in stage_firsts:
            for old in reader.skeleton()["optimizer"]["param_groups"]:
                if old["kind"] == group["kind"]:
                    names.update(dict.fromkeys(old["names"]))
        groups.append({**group, "names": [n for n in names if n in wanted]})
    optimizer["param_groups"] = groups
    optimizer["state"] = opt_state
    optimizer["layout"] = None  # entries cut to what this rank keeps (MuonClip.load_state_dict)
    same_index = readers[rank] if rank < old_world else readers[0]
    state = {k: v for k, v in first.items() if k not in ("model", "optimizer", "rng")}
    state.update(model=model, optimizer=optimizer, rng=fill(same_index.skeleton()["rng"], same_index.tensor))
    return state

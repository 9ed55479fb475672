"""Greedy decoding, the plainest there is: each new token is the argmax of the logits at the last position,
the whole sequence run again each time (no cache). For short samples from fixed prompts in evaluation and
as the reference the export's ``generate()`` is checked against."""

from __future__ import annotations

import torch

from k2model.model import K2ForCausalLM


@torch.no_grad()
def greedy_decode(model: K2ForCausalLM, ids_BT: torch.Tensor, new_tokens: int, eos_id: int | None = None
                  ) -> torch.Tensor:
    """``ids_BT`` followed by up to ``new_tokens`` greedy tokens per row. With ``eos_id``, decoding stops
    once every row has produced it (rows that finished early are padded with ``eos_id``)."""
    ids = ids_BT
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(new_tokens):
        if ids.shape[1] >= model.cfg.max_seq_len:
            break
        nxt = model(ids).logits[:, -1].argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return ids

"""Stepping a compiled program's prefill and both decode modes by hand, against recomputing the whole sequence."""

from __future__ import annotations

import torch


def left_padded(prompts):
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p)
        mask[row, longest - len(p) :] = 1
    return ids, mask


def check_decode_steps(compiled, prompts, steps: int, prefix_views: bool) -> None:
    """Greedy ``steps`` tokens after left-padded ``prompts``: each step's logits from the growing and the static
    cache equal the program over the whole sequence so far. ``prefix_views``: the static step gets its caches'
    filled prefix (as the Generator passes them; HSA needs the slot last), else the whole preallocated caches with
    garbage past the slot (finite: a masked key's probability is 0, and 0 * NaN would be NaN)."""
    programs = compiled._step_programs
    ids, mask = left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt = ids.shape[1]
    with torch.no_grad():
        logits, *caches = programs["prefill"]({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
        assert logits.shape[1] == 1  # prefill returns the last position's logits only
        torch.testing.assert_close(logits[:, -1], compiled(ids, attention_mask=mask, position_ids=positions)[:, -1])
        static = [torch.nn.functional.pad(c, (0, 0, 0, steps)) for c in caches]
        if not prefix_views:
            for c, full in zip(static, caches, strict=True):
                c.uniform_(-1e3, 1e3)[:, :, :prompt] = full
        past_static = torch.nn.functional.pad(mask, (0, steps))
        for i in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids, past = torch.cat([ids, token], 1), mask
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
            step = {"input_ids": token, "attention_mask": torch.ones_like(token), "position_ids": positions[:, -1:]}
            logits, *caches = programs["growing"](step, past, caches)
            slot = prompt + i
            slots = torch.full((len(prompts),), slot)
            if prefix_views:
                static_logits, *_ = programs["static"](step, past_static[:, : slot + 1], [c[:, :, : slot + 1] for c in static], slots)
            else:
                pointers = [c.data_ptr() for c in static]
                static_logits, *static = programs["static"](step, past_static, static, slots)
                assert [c.data_ptr() for c in static] == pointers  # the runtime writes the static cache in place
            past_static[:, slot] = 1
            full = compiled(ids, attention_mask=mask, position_ids=positions)
            torch.testing.assert_close(logits[:, -1], full[:, -1])
            torch.testing.assert_close(static_logits[:, -1], full[:, -1])
            assert caches[0].shape[2] == ids.shape[1] and static[0].shape[2] == prompt + steps

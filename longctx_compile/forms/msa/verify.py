"""``lcc verify`` for msa artifacts: the query program over an encoded bank against the dense model on [document ; query]."""

from __future__ import annotations

from typing import Any

import torch

from ...capture import CausalLM
from ...runtime.verify import ATOL, LENGTHS, RTOL, Case, Report, compare
from .runtime import MsaModel


def verify_msa(original: torch.nn.Module, ep: Any, signature: dict[str, Any], lengths=LENGTHS, rtol: float = RTOL, atol: float = ATOL) -> Report:
    """An msa program against the dense model on [document ; query]: each seeded row's first half is
    encoded as a document, the rest is the query (positions contiguous), and the query's logits are
    compared with the original's at those positions.

    Exactness-configured (pool 1, every layer routed) each row's bank is its own document alone: the
    logits must match. Otherwise the bank holds every row's document plus distractors, and the
    report gives the routing hit rate and the divergence (not judged).
    """
    msa = MsaModel(ep, signature)
    exact = bool(signature.get("exact"))
    reference = CausalLM(original, tuple(signature["inputs"])).eval()
    report = Report(rtol=rtol, atol=atol, exact=exact)
    vocab, batch = signature["vocab_size"], 3
    with torch.no_grad():
        for length in lengths:
            if length < 2 or length > signature["max_len"]:
                continue
            g = torch.Generator().manual_seed(length)
            ids = torch.randint(0, vocab, (batch, length), generator=g)
            split = length // 2
            docs = [row[:split].tolist() for row in ids]
            full = {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if "attention_mask" in signature["inputs"] else {})}
            if "position_ids" in signature["inputs"]:
                full["position_ids"] = torch.arange(length).expand(batch, length)
            ref = reference(**full)[:, split:]
            positions = torch.arange(split, length)[None]
            outs, hits = [], []
            shared = None if exact else msa.encode(docs + [torch.randint(0, vocab, (split,), generator=g).tolist() for _ in range(5)])
            for b in range(batch):
                bank = msa.encode([docs[b]]) if exact else shared
                result = msa.query(bank, ids[b : b + 1, split:], position_ids=positions)
                outs.append(result.logits)
                want = 0 if exact else b
                hits.append(float(all(want in result.docs[layer][0].tolist() for layer in result.docs)))
            real = torch.ones(batch, length - split, dtype=torch.bool)
            report.cases.append(Case(batch, length, False, *compare(ref, torch.cat(outs), real, rtol, atol), hit=sum(hits) / batch))
    return report

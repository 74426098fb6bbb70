"""Fitting an msa model's router projections with MSA's auxiliary loss (the backbone stays frozen).

In MSA the top-k is a hard choice, so the routers learn only from L_aux: a contrastive loss over
the document scores of each question, its own document the positive (InfoNCE, temperature 0.1 as
in the released code). Here the scores are exactly the routing's (``ops.msa.route_ref``: router
query of the question tokens against the pooled router keys of every document, head mean, token
max, chunk max), differentiable in ``router_q_proj`` / ``router_k_proj`` of each routed layer. The
hidden states they project are computed once: documents as encode runs them, questions as the query
runs them with their own document routed in every layer (teacher forcing).
"""

from __future__ import annotations

import torch

from ...ops.msa import pool_ref, route_headwise, route_ref
from .runtime import MsaModel


def _router_weights(model: MsaModel, layer: int) -> tuple[str, str]:
    """The state names of routed layer ``layer``'s (router_q_proj, router_k_proj) weights, as the msa pass recorded them."""
    q, k = model.config["routers"][str(layer)]
    return q, k


def train_router(
    model: MsaModel,
    docs: list[list[int]],
    questions: list[list[int]],
    answers: list[int],
    steps: int = 200,
    lr: float = 1e-3,
    batch: int = 16,
    temperature: float = 0.1,
    seed: int = 0,
    positions=None,
) -> list[str]:
    """Fit the routers so question i routes to document ``answers[i]`` (in place, in the program's weights); a log of the loss.

    ``positions(i)`` gives question i's position ids (default: MSA's, from the prefix and k).
    """
    P, score = model.config["pool"], model.config["score"]
    doc_hidden = model.document_hidden(docs)
    encoded = model.encode(docs)
    query_hidden, routes = [], []
    for i, question in enumerate(questions):
        hidden: list = []
        ids = torch.tensor([question])
        model.query(encoded.subset([answers[i]]), ids, position_ids=None if positions is None else positions(i), hidden=hidden)
        query_hidden.append(hidden)
        seen = torch.arange(1, len(question) + 1)
        routes.append(seen > model.config["prefix"])
    chunk_doc = torch.cat([torch.full((-(-len(d) // P),), n) for n, d in enumerate(docs)])
    weights = {layer: [model.state[name].detach().clone().float().requires_grad_() for name in _router_weights(model, layer)] for layer in model.layers}
    optimizer = torch.optim.Adam([w for pair in weights.values() for w in pair], lr=lr)
    g = torch.Generator().manual_seed(seed)
    log = []
    Hkv, D = model.kv_heads, model.head_dim
    for step in range(steps):
        picked = torch.randperm(len(questions), generator=g)[:batch].tolist()
        loss = 0.0
        for li, layer in enumerate(model.layers):
            wq, wk = weights[layer]
            keys = []
            for h in doc_hidden:
                L = h[li].shape[0]
                pad = -(-L // P) * P - L
                k = torch.nn.functional.pad(h[li].float() @ wk.T, (0, 0, 0, pad)).view(1, L + pad, Hkv, D).transpose(1, 2)
                real = torch.zeros(1, L + pad)
                real[:, :L] = 1
                keys.append(pool_ref(k, real, P)[0][0])  # [Hkv, chunks, D]
            bank_keys = torch.cat(keys, dim=1)
            for i in picked:
                h = query_hidden[i][li].float()  # [1, T, hidden]
                q = (h @ wq.T).view(1, h.shape[1], -1, D).transpose(1, 2)
                if score == "headwise":
                    scores = route_headwise(q, routes[i][None], bank_keys, chunk_doc, len(docs))
                else:
                    scores = route_ref(q, routes[i][None], bank_keys, chunk_doc, len(docs), score == "cosine")
                loss = loss + torch.nn.functional.cross_entropy(scores / temperature, torch.tensor([answers[i]]))
        loss = loss / (len(picked) * len(model.layers))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log.append(f"router step {step}: InfoNCE {loss.item():.3f}")
    with torch.no_grad():
        for layer, (wq, wk) in weights.items():
            for name, w in zip(_router_weights(model, layer), (wq, wk), strict=True):
                model.state[name].copy_(w.to(model.state[name].dtype))
    model.facts["weights"] = model._fingerprint()  # banks encoded before hold the old router keys
    return log

"""``lcc inspect``: what a program is — source, form, target, signature, attention sites, ops, history."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def op_counts(snapshot: dict[str, Any]) -> Counter:
    return Counter(n["target"] for n in snapshot["nodes"] if n["op"] == "call_function")


def kernel_name(site: dict[str, Any]) -> str:
    """``triton`` / ``reference`` (and why, when a Triton target kept the reference)."""
    kernel = site.get("kernel", "")
    name = kernel.rsplit("/", 1)[-1]
    return f"{name} (fallback)" if site.get("fallback") else name


def tiles(site: dict[str, Any]) -> str:
    config = site.get("config")
    if not config:
        return ""
    fmt = "{}x{} w{} s{}"
    return f"{fmt.format(*config['fwd'])} · {fmt.format(*config['bwd'])} ({config['source']})"


def communication(sites: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """Per sequence-parallel site: the collectives inserted and the bytes a rank sends for ``tokens`` tokens."""
    from ..passes.ulysses import comm_bytes

    rows = []
    for s in sites:
        if "degree" not in s:
            continue
        sent = comm_bytes(s, tokens)
        rows.append(
            {
                "layer": s["layer"],
                "module": s["module"],
                "degree": s["degree"],
                "kv_replicated": s["kv_replicated"],
                "collectives": s["collectives"],
                "bytes_forward": sent,
            }
        )
    return rows


def summary(manifest: dict[str, Any], snapshots: dict[str, Any], tokens: int | None = None) -> dict[str, Any]:
    last = snapshots[list(snapshots)[-1]] if snapshots else {"nodes": []}
    tokens = tokens or manifest["signature"]["max_len"]
    return {
        "source": manifest["source"]["spec"],
        "source_kind": manifest["source"]["kind"],
        "family": manifest["source"].get("family"),
        "form": manifest["form"],
        "form_config": manifest.get("form_config", {}),
        "target": manifest["target"],
        "signature": manifest["signature"],
        "parameters": manifest.get("parameters", {}),
        "sites": manifest["sites"],
        "ops": dict(op_counts(last).most_common()),
        "history": manifest["history"],
        "equivalence": manifest.get("equivalence"),
        "communication": {"tokens": tokens, "sites": communication(manifest["sites"], tokens)},
    }


def render(info: dict[str, Any], console: Console) -> None:
    sig = info["signature"]
    params = info["parameters"]
    console.print(f"[bold]{info['source']}[/bold] ({info['source_kind']}, {info['family'] or 'custom'})")
    console.print(f"form [cyan]{info['form']}[/cyan] {escape(str(info['form_config'] or ''))}  target [cyan]{info['target']}[/cyan]")
    console.print(escape(f"inputs {', '.join(sig['inputs'])} [batch, seq ≤ {sig['max_len']}] → logits [batch, seq, {sig['vocab_size']}]"))
    if params:
        console.print(f"parameters {params['count']:,} ({params['bytes'] / 2**20:.1f} MiB)")
    sites = Table("layer", "module", "heads", "D", "mask", "form", "kernel", "tiles (fwd · bwd)", title="attention sites", title_justify="left")
    for s in info["sites"]:
        sites.add_row(str(s["layer"]), s["module"], f"{s['hq']}/{s['hkv']}", str(s["head_dim"]), s["mask"], s["form"], kernel_name(s), tiles(s))
    console.print(sites)
    comm = info["communication"]
    if comm["sites"]:
        title = f"collectives per layer (bytes one rank sends in the forward at {comm['tokens']:,} tokens, batch 1; the backward sends as much)"
        table = Table("layer", "degree", "all-to-all", "all-gather", "KV ×", "q", "k", "v", "out", "total", title=title, title_justify="left")
        for c in comm["sites"]:
            sent = c["bytes_forward"]
            mib = [f"{sent[t] / 2**20:.2f} MiB" for t in ("q", "k", "v", "out")]
            table.add_row(
                str(c["layer"]),
                str(c["degree"]),
                str(c["collectives"]["all_to_all"]),
                str(c["collectives"]["all_gather"]),
                str(c["kv_replicated"]),
                *mib,
                f"{sum(sent.values()) / 2**20:.2f} MiB",
            )
        console.print(table)
    ops = Table("op", "count", title="ops", title_justify="left")
    for name, count in info["ops"].items():
        ops.add_row(name, str(count))
    console.print(ops)
    history = Table("pass", "stage", "matches", "added", "removed", "seconds", title="history", title_justify="left")
    for h in info["history"]:
        history.add_row(h["name"], h["stage"], str(h["matches"]), str(h["added"]), str(h["removed"]), f"{h['seconds']:.3f}")
    console.print(history)
    if info.get("equivalence"):
        eq = info["equivalence"]
        console.print(f"equivalence: {'passed' if eq['passed'] else 'FAILED'} max_abs={eq['max_abs']:.3g} top1={eq['top1']:.3f} kl={eq['kl']:.3g}")

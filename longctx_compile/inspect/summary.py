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


def summary(manifest: dict[str, Any], snapshots: dict[str, Any]) -> dict[str, Any]:
    last = snapshots[list(snapshots)[-1]] if snapshots else {"nodes": []}
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

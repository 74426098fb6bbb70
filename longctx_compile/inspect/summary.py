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
    """``triton`` / ``reference`` / ``ring (reference)`` (and why, when a Triton target kept the reference)."""
    kernel = site.get("kernel", "")
    name = kernel.rsplit("/", 1)[-1]
    for form in ("ring", "hsa", "msa", "evict"):
        if kernel.startswith((f"longctx.{form}_attention", f"longctx.{form}_flash")):
            name = f"{form} ({name})"
    return f"{name} (fallback)" if site.get("fallback") else name


def form_detail(site: dict[str, Any]) -> str:
    """The site's form and its settings, as the form describes them (hsa: S, K, w, score; msa: pool, top-k; evict: budget …)."""
    from ..forms import FORMS

    form = FORMS.get(site.get("form", ""))
    if form is None or form.describe is None:
        return site.get("form", "")
    return form.describe(site)


def tiles(site: dict[str, Any]) -> str:
    config = site.get("config")
    if not config:
        return ""
    if "hsa" in config:
        hsa = config["hsa"]
        return f"{hsa['block_q']}q · {hsa['block_l']}q w{hsa['num_warps']} ({hsa['smem']} B smem)"
    fmt = "{}x{} w{} s{}"
    return f"{fmt.format(*config['fwd'])} · {fmt.format(*config['bwd'])} ({config['source']})"


def communication(sites: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """Per sequence-parallel site: the collectives inserted and the bytes a rank sends for ``tokens`` tokens."""
    from ..forms.sp.rewrite import forward_bytes, step_bytes
    from ..ops.layout import Layout

    rows = []
    for s in sites:
        if "layout" not in s:
            continue
        layout = Layout.from_list(s["layout"])
        rows.append(
            {
                "layer": s["layer"],
                "module": s["module"],
                "degree": s["degree"],
                "ulysses": layout.ulysses,
                "ring": layout.ring,
                "kv_replicated": s["kv_replicated"],
                "collectives": s["collectives"],
                "bytes_forward": forward_bytes(s, layout, tokens),
                "bytes_step": step_bytes(s, layout, tokens),
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
        "programs": {"stored": list(manifest.get("programs", {})), "derived": manifest.get("derived", {})},
        "cache": manifest.get("cache") and {"stored": manifest["cache"]["stored"]},
        "cache_note": manifest.get("cache_note"),
        "communication": {"tokens": tokens, "sites": communication(manifest["sites"], tokens)},
    }


def render(info: dict[str, Any], console: Console) -> None:
    sig = info["signature"]
    params = info["parameters"]
    console.print(f"[bold]{info['source']}[/bold] ({info['source_kind']}, {info['family'] or 'custom'})")
    console.print(f"form [cyan]{info['form']}[/cyan] {escape(str(info['form_config'] or ''))}  target [cyan]{info['target']}[/cyan]")
    console.print(escape(f"inputs {', '.join(sig['inputs'])} [batch, seq ≤ {sig['max_len']}] → logits [batch, seq, {sig['vocab_size']}]"))
    if params:
        console.print(f"parameters {params['count']:,} ({params['bytes'] / 2**20:.1f} MiB, {sig.get('dtype', 'fp32')})")
    sites = Table("layer", "module", "heads", "D", "mask", "form", "kernel", "tiles (fwd · bwd)", title="attention sites", title_justify="left")
    for s in info["sites"]:
        sites.add_row(str(s["layer"]), s["module"], f"{s['hq']}/{s['hkv']}", str(s["head_dim"]), s["mask"], form_detail(s), kernel_name(s), tiles(s))
    console.print(sites)
    derived = ", ".join(f"{namespace}.{name}" for namespace, names in info["programs"]["derived"].items() for name in names)
    console.print(f"programs: {', '.join(info['programs']['stored'])}" + (f"; derived from model.pt2 when asked: {derived}" if derived else ""))
    if info["cache"]:
        kinds = sorted({"+".join(names) for names in info["cache"]["stored"]})
        console.print(f"KV cache: {' / '.join(kinds)} per key at each of {len(info['cache']['stored'])} sites (lcc generate)")
    else:
        console.print(f"no KV cache: {escape(info['cache_note'] or 'not recorded')}")
    comm = info["communication"]
    if comm["sites"]:
        why = sig.get("sequence_parallel", {}).get("why")
        if why:
            console.print(f"sequence parallel: {escape(why)}")
        title = f"collectives per layer (bytes one rank sends at {comm['tokens']:,} tokens, batch 1)"
        table = Table(
            "layer",
            "U×R",
            "all-to-all",
            "all-gather",
            "send/recv",
            "KV ×",
            "q",
            "k",
            "v",
            "out",
            "ring kv",
            "forward",
            "fwd+bwd",
            title=title,
            title_justify="left",
        )
        for c in comm["sites"]:
            sent = c["bytes_forward"]
            mib = [f"{sent[t] / 2**20:.2f} MiB" if t in sent else "-" for t in ("q", "k", "v", "out", "kv")]
            calls = c["collectives"]
            table.add_row(
                str(c["layer"]),
                f"{c['ulysses']}×{c['ring']}",
                str(calls["all_to_all"]),
                str(calls["all_gather"]),
                str(calls.get("send_recv", 0)),
                str(c["kv_replicated"]),
                *mib,
                f"{sum(sent.values()) / 2**20:.2f} MiB",
                f"{c['bytes_step'] / 2**20:.2f} MiB",
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
    runs = sig.get("train", [])
    if runs:
        table = Table(
            "objective", "trainable", "steps", "tokens", "ranks", "first loss", "last loss", "data", title="training runs (lcc train)", title_justify="left"
        )
        for r in runs:
            ranks = r.get("ranks", {}).get("nproc", 1)
            losses = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-" for k in ("first_loss", "last_loss")]
            table.add_row(
                r["objective"], str(r["trainable"]), str(r["steps"]), f"{r.get('length', '-')}×{r.get('batch', 1)}", str(ranks), *losses, escape(str(r["data"]))
            )
        console.print(table)
    if info.get("equivalence"):
        eq = info["equivalence"]
        console.print(f"equivalence: {'passed' if eq['passed'] else 'FAILED'} max_abs={eq['max_abs']:.3g} top1={eq['top1']:.3f} kl={eq['kl']:.3g}")

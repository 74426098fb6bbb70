"""Attention kernel throughput: lcc's Triton flash attention against PyTorch's own fast paths.

T = 4K/8K/16K/32K, D = 64/128, bf16, causal and sliding window (1024 keys). Each shape holds
32K tokens (batch = 32K / T) and H x D = 2048. FLOPs count the visible (query, key) pairs only:
forward 4·B·H·D·pairs, backward 2.5x the forward. Causal rows compare with
``scaled_dot_product_attention`` on its flash backend; windowed rows with FlexAttention (compiled),
since SDPA's flash backend has no window. TFLOP/s are also shown as a share of the target's dense
bf16 peak. Before timing, each shape checks our output against the baseline's.

    python bench/attention_kernels.py               # on a GPU: the table; paste it into bench/RESULTS.md
    python bench/attention_kernels.py --autotune    # time candidate tile configs first (cached per shape)
    python bench/attention_kernels.py --smoke       # tiny shapes on CPU under Triton's interpreter: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LENGTHS = (4096, 8192, 16384, 32768)
HEAD_DIMS = (64, 128)
WINDOW = 1024
TOKENS = 32768
HIDDEN = 2048
GOAL = 0.85  # forward vs SDPA-flash on H100 at D=128 (FlexAttention reaches ~85% of FA3)

console = Console(width=220)  # the table is pasted into bench/RESULTS.md whole


def visible_pairs(T: int, window: int) -> int:
    """(query, key) pairs a causal mask, optionally windowed, lets through."""
    if window <= 0 or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def timer(smoke: bool):
    """Median milliseconds of a callable: ``triton.testing.do_bench`` on a GPU, wall clock on CPU."""
    if not smoke:
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def wall(fn):
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return wall


def baseline(q, k, v, window: int, smoke: bool):
    """PyTorch's attention for the same shape: SDPA flash (causal) or FlexAttention (window)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    T = q.shape[2]
    if window == 0 or smoke:  # FlexAttention has no CPU backward; the smoke run uses SDPA's math path
        backend = SDPBackend.MATH if smoke else SDPBackend.FLASH_ATTENTION
        i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
        mask = (i >= j) & (i - j < window) if window else None

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)

        return run, "sdpa-math" if smoke else "sdpa-flash"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < window), None, None, T, T, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    return (lambda: flex(q, k, v, block_mask=block_mask)), "flex"


def measure(T: int, D: int, window: int, target, smoke: bool, tune: bool, batch_tokens: int, hidden: int) -> dict:
    from longctx_compile.kernels import attention as kernels
    from longctx_compile.targets import autotune
    from longctx_compile.targets.configs import Shape, choose

    B, H = max(1, batch_tokens // T), hidden // D
    dtype = torch.bfloat16
    device = "cpu" if smoke else "cuda"
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype)
    scale = D**-0.5
    shape = Shape(D, D, dtype, 1, H, min(T, 4096))
    configs = choose(target, shape)
    if tune and not smoke:
        key = autotune.cache_key(target, shape, f"causal-window{window}", torch.cuda.get_device_name())
        configs, _ = autotune.tune(target, shape, key, autotune.gpu_bench(shape, True, window))

    def ours_fwd():
        return kernels.attention_fwd(q, k, v, None, None, None, scale, True, window, configs.fwd)

    def ours_fwd_bwd():
        out, lse = ours_fwd()
        return kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, None, scale, True, window, configs.bwd)

    base, base_name = baseline(q, k, v, window, smoke)

    def base_fwd_bwd():
        return torch.autograd.grad(base(), (q, k, v), grad)

    with torch.no_grad():
        got, want = ours_fwd()[0].float(), base().float()
    error = (got - want).abs().max().item()
    if error > 5e-2:
        raise SystemExit(f"T={T} D={D} window={window}: our output differs from {base_name} by {error:.3g}; not timing a wrong kernel")
    bench = timer(smoke)
    flops = 4 * B * H * D * visible_pairs(T, window)
    with torch.no_grad():
        ms = {"ours_fwd": bench(ours_fwd), "base_fwd": bench(base)}
    ms["ours_fb"], ms["base_fb"] = bench(ours_fwd_bwd), bench(base_fwd_bwd)
    tflops = {name: (flops if name.endswith("fwd") else 3.5 * flops) / (t * 1e-3) / 1e12 for name, t in ms.items()}
    return {"T": T, "D": D, "B": B, "H": H, "mask": f"window {window}" if window else "causal", "baseline": base_name, "fwd": configs.fwd.as_list(),
            "bwd": configs.bwd.as_list(), "max_abs_error": error, "ms": ms, "tflops": tflops}  # fmt: skip


def render(rows: list[dict], peak: float | None, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("mask", "T", "D", "B×H", "vs", "fwd TF/s", "base fwd", "fwd ratio", "fwd % peak", "f+b TF/s", "base f+b", "f+b ratio", "tiles fwd · bwd"):
        table.add_column(name, justify="left" if name in ("mask", "vs", "tiles fwd · bwd") else "right")
    fmt = "{}x{} w{} s{}"
    for r in rows:
        t = r["tflops"]
        table.add_row(
            r["mask"], str(r["T"]), str(r["D"]), f"{r['B']}×{r['H']}", r["baseline"],
            f"{t['ours_fwd']:.1f}", f"{t['base_fwd']:.1f}", f"{t['ours_fwd'] / t['base_fwd']:.2f}×",
            f"{100 * t['ours_fwd'] / peak:.0f}%" if peak else "-",
            f"{t['ours_fb']:.1f}", f"{t['base_fb']:.1f}", f"{t['ours_fb'] / t['base_fb']:.2f}×",
            f"{fmt.format(*r['fwd'])} · {fmt.format(*r['bwd'])}",
        )  # fmt: skip
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter (harness check, no figures)")
    parser.add_argument("--autotune", action="store_true", help="autotune tile configs per shape before timing")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from longctx_compile.targets import TARGETS, detect

    if args.smoke:
        target, lengths, dims, window, tokens, hidden = TARGETS["interpret"], (64,), (16,), 32, 64, 32
    elif not torch.cuda.is_available():
        console.print("bench/attention_kernels.py needs a CUDA GPU and none is present; nothing measured.")
        console.print("(The kernels' correctness is checked on CPU by tests/test_kernels.py under Triton's interpreter.)")
        return 0
    else:
        target, lengths, dims, window, tokens, hidden = detect(), LENGTHS, HEAD_DIMS, WINDOW, TOKENS, HIDDEN
        if target is None:
            console.print(f"{torch.cuda.get_device_name()} is not a known target; configs and peaks follow h100")
            target = TARGETS["h100"]
    device = "CPU (interpreter)" if args.smoke else torch.cuda.get_device_name()
    import triton

    jobs = [(T, D, w) for w in (0, window) for D in dims for T in lengths]
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing", total=len(jobs))
        for T, D, w in jobs:
            progress.update(task, description=f"T={T} D={D} {'window' if w else 'causal'}")
            rows.append(measure(T, D, w, target, args.smoke, args.autotune, tokens, hidden))
            progress.advance(task)
    peak = None if args.smoke else target.peak_tflops("bf16")
    title = f"lcc flash attention vs PyTorch, bf16, {device} ({target.name}, peak {peak} TF/s), torch {torch.__version__}, triton {triton.__version__}"
    console.print(render(rows, peak, title))
    goal_rows = [r for r in rows if r["D"] == 128 and r["mask"] == "causal"]
    if goal_rows and not args.smoke:
        worst = min(r["tflops"]["ours_fwd"] / r["tflops"]["base_fwd"] for r in goal_rows)
        verdict = "met" if worst >= GOAL else "NOT met"
        console.print(f"goal: forward ≥ {GOAL:.0%} of SDPA-flash at D=128 causal: worst {worst:.2f}× → {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "target": target.name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

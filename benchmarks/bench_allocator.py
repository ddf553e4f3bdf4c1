"""Issue 2 benchmark: l2side's side-aware caching allocator against torch's native caching allocator.

    python benchmarks/bench_allocator.py [--out DIR] [--steps 60] [--parts firsttouch,emptyloop,train]

torch can only swap its allocator before CUDA starts, so every (part, mode) runs in a fresh child process
(`--child --mode native|l2side --part P --json FILE`); this parent runs both modes of each part, prints a
markdown table and writes allocator.csv / allocator.json to --out.

Parts:
  firsttouch  allocate 8 GiB of new memory (64 MiB tensors, then after empty_cache 1 GiB tensors) in a fresh
              process, synchronised; then the first write. Target (l2side): < 1 s.
  emptyloop   cache-hit `torch.empty(n)` + free, per iteration, median of repeats (4 KiB, 1 MiB, 64 MiB).
              Target: l2side <= 1.15x native.
  train       a small GPT-2 (transformers config, random weights, no download; a hand-written
              nn.TransformerEncoder LM if transformers is missing) trained with AdamW under bf16 autocast with
              deterministic settings on fixed data. Losses must be equal in both modes; median step time within
              3% of native; peak reserved <= 1.10x native; after deleting model/optimizer + empty_cache,
              reserved back to the baseline (no leak).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
MODES = ("native", "l2side")
PARTS = ("firsttouch", "emptyloop", "train")


# ----------------------------------------------------------------------------------------------- child side
def _setup(mode: str):
    """Imports torch with `mode`'s allocator and starts CUDA. Returns (torch, l2side or None)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    l2side = None
    if mode == "l2side":
        import l2side as _l2side
        _l2side.enable()  # before torch's first CUDA allocation
        l2side = _l2side
    import torch
    torch.zeros(1, device="cuda")  # CUDA context + allocator start-up are not part of any measurement
    torch.cuda.synchronize()
    return torch, l2side


def _reserved(torch, l2side, peak=False) -> int:
    if l2side is not None:
        return int(l2side.memory_stats()["reserved_bytes.all." + ("peak" if peak else "current")])
    return int(torch.cuda.max_memory_reserved() if peak else torch.cuda.memory_reserved())


def _allocated(torch, l2side, peak=False) -> int:
    if l2side is not None:
        return int(l2side.memory_stats()["allocated_bytes.all." + ("peak" if peak else "current")])
    return int(torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated())


def _empty_cache(torch, l2side) -> None:
    gc.collect()
    torch.cuda.synchronize()
    if l2side is not None:
        l2side.empty_cache()
    else:
        torch.cuda.empty_cache()


def _reset_peaks(torch, l2side) -> None:
    if l2side is not None:
        l2side.reset_peak_memory_stats()
    else:
        torch.cuda.reset_peak_memory_stats()


def part_firsttouch(torch, l2side, args) -> dict:
    out = {}
    for label, chunk in (("64MiB", 64 * MiB), ("1GiB", GiB)):
        n = args.touch_bytes // chunk
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tensors = [torch.empty(chunk, dtype=torch.uint8, device="cuda") for _ in range(n)]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for x in tensors:
            x.zero_()
        x = None
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        out[f"alloc_s_{label}"] = t1 - t0
        out[f"write_s_{label}"] = t2 - t1
        out[f"reserved_{label}"] = _reserved(torch, l2side)
        tensors.clear()
        _empty_cache(torch, l2side)
    out["touch_bytes"] = args.touch_bytes
    return out


def part_emptyloop(torch, l2side, args) -> dict:
    out = {}
    sizes = {"4KiB": 4 * KiB, "1MiB": MiB, "64MiB": 64 * MiB}
    for label, n in sizes.items():
        iters = args.loop_iters
        for _ in range(3):  # warm: the block is cached after the first free
            x = torch.empty(n, dtype=torch.uint8, device="cuda")
            del x
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                x = torch.empty(n, dtype=torch.uint8, device="cuda")
                del x
            samples.append((time.perf_counter() - t0) / iters * 1e9)
        out[f"ns_{label}"] = statistics.median(samples)
        out[f"ns_{label}_min"] = min(samples)
    return out


def _build_model(torch, args):
    """A small causal LM with random weights. Returns (model, description)."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                         n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         use_cache=False, bos_token_id=0, eos_token_id=0)
        try:
            model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
        except TypeError:
            cfg._attn_implementation = "eager"
            model = GPT2LMHeadModel(cfg)
        return model.float(), (f"transformers {transformers.__version__} GPT2LMHeadModel (eager attention), "
                               f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
                               f"vocab {args.vocab}")
    except Exception as e:  # noqa: BLE001 -- any failure: the fallback model, said loudly
        print(f"bench_allocator: transformers unavailable ({type(e).__name__}: {e}); "
              "using a hand-written nn.TransformerEncoder LM instead", file=sys.stderr)
        nn = torch.nn

        class TinyLM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(args.vocab, args.hidden)
                self.pos = nn.Parameter(torch.randn(args.seq, args.hidden) * 0.02)
                layer = nn.TransformerEncoderLayer(args.hidden, args.heads, 4 * args.hidden, dropout=0.0,
                                                   batch_first=True, norm_first=True, activation="gelu")
                self.body = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
                self.norm = nn.LayerNorm(args.hidden)
                self.head = nn.Linear(args.hidden, args.vocab, bias=False)

            def forward(self, input_ids, labels):
                s = input_ids.shape[1]
                mask = nn.Transformer.generate_square_subsequent_mask(s, device=input_ids.device)
                h = self.body(self.embed(input_ids) + self.pos[:s], mask=mask, is_causal=True)
                logits = self.head(self.norm(h))
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   labels[:, 1:].reshape(-1))

                class Out:
                    pass
                o = Out()
                o.loss = loss
                return o

        return TinyLM(), (f"FALLBACK nn.TransformerEncoder LM (transformers unavailable: {type(e).__name__}), "
                          f"hidden {args.hidden}, {args.layers} layers")


def part_train(torch, l2side, args) -> dict:
    import warnings
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    caught = []
    warnings.showwarning = lambda msg, *a, **k: caught.append(str(msg))

    # Warm cuBLAS (handles, workspace) so the baseline holds what torch keeps for the process anyway.
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (a @ a).float().sum().backward()
    del a
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    _empty_cache(torch, l2side)
    baseline_reserved = _reserved(torch, l2side)
    baseline_allocated = _allocated(torch, l2side)
    _reset_peaks(torch, l2side)

    torch.manual_seed(0)
    model, description = _build_model(torch, args)
    model = model.cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).cuda()
               for _ in range(args.data_batches)]
    torch.cuda.synchronize()

    losses, step_s = [], []
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss.detach())
        if step >= args.warmup:
            step_s.append(dt)
    losses = [float(x) for x in torch.stack(losses).cpu().tolist()]
    peak_reserved = _reserved(torch, l2side, peak=True)
    peak_allocated = _allocated(torch, l2side, peak=True)
    extra = {}
    if l2side is not None:
        s = l2side.memory_stats()
        extra = {k: int(s[k]) for k in ("l2side.pages.side0.total", "l2side.pages.side1.total", "num_device_alloc",
                                        "num_alloc_retries", "num_ooms") if k in s}

    del model, opt, batches, ids, loss
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    _empty_cache(torch, l2side)
    return {
        "model": description,
        "tokens_per_step": args.batch * args.seq,
        "steps": args.steps,
        "losses": losses,
        "step_ms_median": statistics.median(step_s) * 1e3,
        "step_ms_min": min(step_s) * 1e3,
        "peak_reserved": peak_reserved,
        "peak_allocated": peak_allocated,
        "baseline_reserved": baseline_reserved,
        "baseline_allocated": baseline_allocated,
        "final_reserved": _reserved(torch, l2side),
        "final_allocated": _allocated(torch, l2side),
        "determinism_warnings": sorted(set(caught))[:10],
        **extra,
    }


def child(args) -> int:
    torch, l2side = _setup(args.mode)
    result = {"mode": args.mode, "part": args.part, "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__}
    result.update({"firsttouch": part_firsttouch, "emptyloop": part_emptyloop, "train": part_train}[args.part](
        torch, l2side, args))
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------------------------- parent side
def _run_child(mode, part, args, passthrough):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--part", part, "--json", path,
           *passthrough]
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = -9, str(e.stdout or ""), f"timed out after {args.child_timeout} s"
    wall = time.perf_counter() - t0
    result = None
    if rc == 0:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            stderr += f"\nno result JSON: {e}"
    try:
        os.unlink(path)
    except OSError:
        pass
    print(f"  [{part}/{mode}] rc={rc} in {wall:.1f} s", flush=True)
    if rc != 0 or result is None:
        print(f"----- {part}/{mode} failed (rc={rc}); stdout/stderr tail:\n{stdout[-3000:]}\n{stderr[-6000:]}\n-----",
              flush=True)
    elif stderr.strip():
        print("    stderr: " + stderr.strip()[-1500:].replace("\n", "\n    "), flush=True)
    return result


def _fmt_bytes(n):
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}{unit}"
    return f"{v}{unit}"


def parent(args, passthrough) -> int:
    try:
        import torch
        if not torch.cuda.is_available():
            print("bench_allocator: no CUDA GPU found; nothing to measure.")
            return 0
    except Exception as e:  # noqa: BLE001
        print(f"bench_allocator: torch/CUDA unavailable ({e}); nothing to measure.")
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in PARTS:
            print(f"unknown part {p!r}; choose from {','.join(PARTS)}")
            return 2
    t_start = time.perf_counter()
    print(f"bench_allocator: parts {','.join(parts)}, each mode in its own process", flush=True)
    results = {}
    failed = []
    for part in parts:
        for mode in MODES:
            r = _run_child(mode, part, args, passthrough)
            results[(part, mode)] = r
            if r is None:
                failed.append(f"{part}/{mode}")

    device = next((r["device"] for r in results.values() if r), "?")
    rows = []  # metric, native, l2side, ratio, target, ok (None: no target)

    def get(part, mode, key):
        r = results.get((part, mode))
        return None if r is None else r.get(key)

    def ratio(a, b):
        return None if (a is None or b is None or b == 0) else a / b

    if "firsttouch" in parts:
        tb = get("firsttouch", "l2side", "touch_bytes") or get("firsttouch", "native", "touch_bytes") or 0
        for label in ("64MiB", "1GiB"):
            n, l2 = get("firsttouch", "native", f"alloc_s_{label}"), get("firsttouch", "l2side", f"alloc_s_{label}")
            rows.append((f"first touch: allocate {tb / GiB:g} GiB new memory in {label} tensors (s)"
                         + (" [after empty_cache]" if label == "1GiB" else " [fresh process]"),
                         n, l2, ratio(l2, n), "l2side < 1 s", None if l2 is None else l2 < 1.0))
            n, l2 = get("firsttouch", "native", f"write_s_{label}"), get("firsttouch", "l2side", f"write_s_{label}")
            rows.append((f"first touch: first write of those {label} tensors (s)", n, l2, ratio(l2, n), "", None))
    if "emptyloop" in parts:
        for label in ("4KiB", "1MiB", "64MiB"):
            n, l2 = get("emptyloop", "native", f"ns_{label}"), get("emptyloop", "l2side", f"ns_{label}")
            rt = ratio(l2, n)
            rows.append((f"cache-hit torch.empty({label}) + free (ns/iter, median)", n, l2, rt, "<= 1.15x",
                         None if rt is None else rt <= 1.15))
    loss_diff = None
    if "train" in parts:
        ln, ll = get("train", "native", "losses"), get("train", "l2side", "losses")
        if ln is not None and ll is not None:
            loss_diff = max(abs(a - b) for a, b in zip(ln, ll)) if len(ln) == len(ll) else float("inf")
            rows.append((f"training: max |loss native - loss l2side| over {len(ln)} steps", 0.0, loss_diff, None,
                         "== 0", loss_diff == 0.0))
            rows.append(("training: loss first -> last", f"{ln[0]:.5f} -> {ln[-1]:.5f}",
                         f"{ll[0]:.5f} -> {ll[-1]:.5f}", None, "", None))
        n, l2 = get("train", "native", "step_ms_median"), get("train", "l2side", "step_ms_median")
        rt = ratio(l2, n)
        rows.append(("training: step time (ms, median, synchronised)", n, l2, rt, "<= 1.03x",
                     None if rt is None else rt <= 1.03))
        n, l2 = get("train", "native", "peak_reserved"), get("train", "l2side", "peak_reserved")
        rt = ratio(l2, n)
        rows.append(("training: peak reserved", _fmt_bytes(n), _fmt_bytes(l2), rt, "<= 1.10x",
                     None if rt is None else rt <= 1.10))
        n, l2 = get("train", "native", "peak_allocated"), get("train", "l2side", "peak_allocated")
        rows.append(("training: peak allocated", _fmt_bytes(n), _fmt_bytes(l2), ratio(l2, n), "", None))
        for mode_key, what in (("reserved", "reserved"), ("allocated", "allocated")):
            vals = {}
            for mode in MODES:
                b, f = get("train", mode, f"baseline_{mode_key}"), get("train", mode, f"final_{mode_key}")
                vals[mode] = None if b is None or f is None else f - b
            l2 = vals["l2side"]
            rows.append((f"training: {what} after del + empty_cache minus baseline (bytes)", vals["native"], l2,
                         None, "l2side == 0", None if l2 is None else l2 == 0))

    lines = ["| metric | native | l2side | l2side/native | target | met |", "|---|---|---|---|---|---|"]
    for metric, n, l2, rt, target, ok in rows:
        lines.append(f"| {metric} | {_fmt(n)} | {_fmt(l2)} | {'-' if rt is None else f'{rt:.3f}x'} | {target} | "
                     f"{'' if ok is None else ('yes' if ok else '**NO**')} |")
    model = get("train", "l2side", "model") or get("train", "native", "model")
    print()
    print(f"### l2side allocator vs native ({device})")
    if model:
        print(f"Model: {model}; {get('train', 'native', 'tokens_per_step') or get('train', 'l2side', 'tokens_per_step')}"
              f" tokens/step, bf16 autocast, AdamW, deterministic algorithms.")
    print()
    print("\n".join(lines))
    for mode in MODES:
        w = get("train", mode, "determinism_warnings")
        if w:
            print(f"\n{mode}: determinism warnings (ops without a deterministic implementation):")
            for x in w:
                print("  " + x[:300])
    if get("train", "l2side", "l2side.pages.side0.total") is not None:
        print(f"\nl2side during training: pages side0/side1 = {get('train', 'l2side', 'l2side.pages.side0.total')}/"
              f"{get('train', 'l2side', 'l2side.pages.side1.total')}, num_device_alloc = "
              f"{get('train', 'l2side', 'num_device_alloc')}, retries = {get('train', 'l2side', 'num_alloc_retries')}")
    checked = [r for r in rows if r[5] is not None]
    met = sum(1 for r in checked if r[5])
    print(f"\ntargets met: {met}/{len(checked)}; failed children: {failed or 'none'}; "
          f"total {time.perf_counter() - t_start:.0f} s")

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "allocator.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["metric", "native", "l2side", "ratio", "target", "met"])
            for metric, n, l2, rt, target, ok in rows:
                w.writerow([metric, n, l2, "" if rt is None else f"{rt:.4f}", target, "" if ok is None else ok])
        with open(os.path.join(args.out, "allocator.json"), "w") as f:
            json.dump({"device": device, "rows": [dict(zip(("metric", "native", "l2side", "ratio", "target", "met"),
                                                               r)) for r in rows],
                       "raw": {f"{p}/{m}": r for (p, m), r in results.items()}, "failed": failed}, f, indent=1,
                      default=str)
        print(f"wrote {os.path.join(args.out, 'allocator.csv')} and allocator.json")
    if failed or loss_diff not in (None, 0.0):
        return 1
    if args.strict and met != len(checked):
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for allocator.csv / allocator.json")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--strict", action="store_true", help="exit 1 when a performance target is missed")
    p.add_argument("--child-timeout", type=int, default=240)
    # child / workload knobs (passed through to the children)
    p.add_argument("--steps", type=int, default=60, help="measured training steps (>= 50 for the issue)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data-batches", type=int, default=4)
    p.add_argument("--loop-iters", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--touch-bytes", type=int, default=8 * GiB)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    knobs = ["steps", "warmup", "hidden", "layers", "heads", "vocab", "seq", "batch", "data_batches", "loop_iters",
             "repeats", "touch_bytes"]
    passthrough = []
    for k in knobs:
        passthrough += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return parent(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())

"""Top SASS lines by warp-stall samples from `ncu --import R --page source --csv --print-source sass`
(kernel work: which instructions the warps wait at), one table per profiled kernel in the report.
Usage: python scripts/ncu_source_top.py FILE.csv [N]"""
import csv
import sys


def num(v):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def report(head, rows, top):
    src = head.index("Source")
    sample_cols = [i for i, c in enumerate(head) if "Sampling" in c and "All" in c] or \
                  [i for i, c in enumerate(head) if "Sampling" in c]
    if not sample_cols:
        print("no sampling column; columns:", head)
        return
    col = sample_cols[0]
    total = sum(num(r[col]) for r in rows) or 1.0
    print(f"{len(rows)} SASS lines, {total:.0f} samples ({head[col]})")
    for i, r in sorted(enumerate(rows), key=lambda x: -num(x[1][col]))[:top]:
        print(f"{num(r[col]) / total * 100:5.1f}%  #{i:5d}  {r[src].strip()[:110]}")


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    # each kernel's table starts with a header row holding a "Source" column
    starts = [i for i, r in enumerate(lines) if any(c.strip() == "Source" for c in r)]
    if not starts:
        print("no 'Source' column; first lines:\n" + "\n".join(",".join(r)[:200] for r in lines[:8]))
        return 1
    for n, at in enumerate(starts):
        head = [c.strip() for c in lines[at]]
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        rows = [r for r in lines[at + 1:end] if len(r) == len(head)]
        print(f"== kernel {n + 1} of {len(starts)}")
        report(head, rows, top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Top SASS lines by warp-stall samples from `ncu --import R --page source --csv --print-source sass`
(kernel work: which instructions the warps wait at). Usage: python scripts/ncu_source_top.py FILE.csv [N]"""
import csv
import sys


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        lines = [row for row in csv.reader(f)]
    head_at = next((i for i, r in enumerate(lines) if any("Source" == c.strip() for c in r)), None)
    if head_at is None:
        print("no 'Source' column; first lines:\n" + "\n".join(",".join(r)[:200] for r in lines[:8]))
        return 1
    head = [c.strip() for c in lines[head_at]]
    rows = [r for r in lines[head_at + 1:] if len(r) == len(head)]
    src = head.index("Source")
    sample_cols = [i for i, c in enumerate(head) if "Sampling" in c and "All" in c] or \
                  [i for i, c in enumerate(head) if "Sampling" in c]
    if not sample_cols:
        print("columns:", head)
        return 1
    col = sample_cols[0]

    def num(v):
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return 0.0
    total = sum(num(r[col]) for r in rows) or 1.0
    print(f"{len(rows)} SASS lines, {total:.0f} samples ({head[col]}); other columns: "
          + ", ".join(h for h in head if "stall" in h.lower())[:400])
    for i, r in sorted(enumerate(rows), key=lambda x: -num(x[1][col]))[:top]:
        print(f"{num(r[col]) / total * 100:5.1f}%  #{i:5d}  {r[src].strip()[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

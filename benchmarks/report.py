"""Markdown tables from a committed attention result file (what README shows).

    python benchmarks/report.py benchmarks/results/attention_h100.json
"""

import json
import sys


def main(path):
    d = json.load(open(path))
    rec = d["records"]

    def ms(impl, H, D, L, docs=1, acp=False):
        for r in rec:
            if (r["impl"], r["H"], r["D"], r["L"], r["docs"]) == (impl, H, D, L, docs) and (impl != "fox" or r["acp"] == acp):
                return r
        return None

    shapes = sorted({(r["H"], r["D"]) for r in rec}, key=lambda x: x[1])
    lengths = sorted({r["L"] for r in rec})
    print("| H x D | L | FoX | FoX + ACP (kept tiles) | SDPA flash | SDPA cuDNN | FLA FoX | Flex causal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for H, D in shapes:
        for L in lengths:
            full, acp = ms("fox", H, D, L), ms("fox", H, D, L, acp=True)
            peers = [ms(p, H, D, L) for p in ("sdpa_flash", "sdpa_cudnn", "fla_fox", "flex_plain")]
            cells = [f"{full['ms']:.2f}", f"{acp['ms']:.2f} ({acp['kept_tiles']:.2f})"]
            cells += [f"{p['ms']:.2f}" if p else "-" for p in peers]
            print(f"| {H} x {D} | {L} | " + " | ".join(cells) + " |")
    print()
    print("| H x D | L | FoX, 8 docs/row | FoX + ACP, 8 docs/row (kept tiles) | FLA FoX, 8 docs/row |")
    print("|---|---:|---:|---:|---:|")
    for H, D in shapes:
        for L in lengths:
            full, acp, fla = ms("fox", H, D, L, 8), ms("fox", H, D, L, 8, True), ms("fla_fox", H, D, L, 8)
            if full and acp:
                print(f"| {H} x {D} | {L} | {full['ms']:.2f} | {acp['ms']:.2f} ({acp['kept_tiles']:.2f}) | "
                      + (f"{fla['ms']:.2f}" if fla else "-") + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/attention_h100.json")

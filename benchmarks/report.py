"""Markdown tables from committed result files (what README shows).

    python benchmarks/report.py benchmarks/results/attention_h200.json benchmarks/results/attention_packed_h200.json
    python benchmarks/report.py benchmarks/results/cp_attention_h200.json
"""

import json
import sys


def _finder(rec):
    def ms(impl, H, D, L, docs=1, acp=False):
        for r in rec:
            if (r["impl"], r["H"], r["D"], r["L"], r["docs"]) == (impl, H, D, L, docs) and (
                    not impl.startswith("fox") or r["acp"] == acp):
                return r
        return None
    return ms


def main(path, packed_path=None):
    """One table per file: the single-document run, and the packed-document
    run (``packed_path``, the same file when not given); every ratio in a
    table compares numbers of one run."""
    rec = json.load(open(path))["records"]
    ms = _finder(rec)
    shapes = sorted({(r["H"], r["D"]) for r in rec}, key=lambda x: x[1])
    lengths = sorted({r["L"] for r in rec})
    print("| H x D | L | FoX | FoX + ACP (kept tiles) | SDPA flash | SDPA cuDNN | FLA FoX | Flex causal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for H, D in shapes:
        for L in lengths:
            full, acp = ms("fox", H, D, L), ms("fox", H, D, L, acp=True)
            if not (full and acp):
                continue
            peers = [ms(p, H, D, L) for p in ("sdpa_flash", "sdpa_cudnn", "fla_fox", "flex_plain")]
            cells = [f"{full['ms']:.2f}", f"{acp['ms']:.2f} ({acp['kept_tiles']:.2f})"]
            cells += [f"{p['ms']:.2f}" if p else "-" for p in peers]
            print(f"| {H} x {D} | {L} | " + " | ".join(cells) + " |")
    print()
    rec = json.load(open(packed_path or path))["records"]
    ms = _finder(rec)
    print("| H x D | L | FoX, 8 docs/row | same documents as rows | FoX + ACP, 8 docs/row (kept tiles) "
          "| same documents as rows, ACP | FLA FoX, 8 docs/row |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dash = lambda r, f="{:.2f}": f.format(r["ms"]) if r else "-"  # noqa: E731
    for H, D in shapes:
        for L in lengths:
            full, acp, fla = ms("fox", H, D, L, 8), ms("fox", H, D, L, 8, True), ms("fla_fox", H, D, L, 8)
            sep, sep_acp = ms("fox_separate", H, D, L, 8), ms("fox_separate", H, D, L, 8, True)
            if full and acp:
                print(f"| {H} x {D} | {L} | {full['ms']:.2f} | {dash(sep)} | {acp['ms']:.2f} ({acp['kept_tiles']:.2f}) | "
                      f"{dash(sep_acp)} | {dash(fla)} |")


def cp_main(path):
    """Context-parallel attention: time, bytes and the ratios the targets name."""
    d = json.load(open(path))
    rec = d["records"]

    def find(mode, acp, cp, L, skip=None, two_way=True):
        for r in rec:
            if (r["mode"], r["acp"], r["cp"], r["L"]) == (mode, acp, cp, L) and (
                    mode != "ring" or (r.get("skip"), r.get("two_way")) == (skip, two_way)):
                return r
        return None

    P = max(r["cp"] for r in rec)
    print(f"| L | variant (CP = {P}) | ms | KV bytes (GB) | bytes vs dense ring | speed-up vs ring without ACP "
          f"| strong-scaling efficiency |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for L in sorted({r["L"] for r in rec}):
        dense = find("ring", False, P, L, "dense")
        for name, mode, acp, skip in (("ring, no ACP", "ring", False, "dense"),
                                      ("ring, ACP in the kernel only", "ring", True, "dense"),
                                      ("ACP ring (skip table)", "ring", True, "acp"),
                                      ("ACP ring, a kernel call per kept suffix", "ring", True, "acp_split"),
                                      ("Ulysses, no ACP", "ulysses", False, None),
                                      ("Ulysses + ACP", "ulysses", True, None)):
            r = find(mode, acp, P, L, skip)
            one = find("single", acp, 1, L)
            if r is None or r["ms"] is None:
                continue
            cells = [f"{r['ms']:.1f}", f"{r['kv_bytes'] / 1e9:.2f}"]
            cells.append(f"{1 - r['kv_bytes'] / dense['kv_bytes']:.0%} fewer" if mode == "ring" and dense else "-")
            cells.append(f"{dense['ms'] / r['ms']:.2f}x" if mode == "ring" and dense and acp else "-")
            cells.append(f"{one['ms'] / (P * r['ms']):.2f}" if one and one["ms"] else "-")
            print(f"| {L} | {name} | " + " | ".join(cells) + " |")
        for acp in (False, True):
            one = find("single", acp, 1, L)
            if one and one["ms"]:
                print(f"| {L} | CP = 1{' + ACP' if acp else ''} | {one['ms']:.1f} | - | - | - | - |")


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/attention_h100.json"
    if json.load(open(path))["records"][0].get("bench") == "cp_attention":
        cp_main(path)
    else:
        main(path, sys.argv[2] if len(sys.argv) > 2 else None)

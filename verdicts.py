"""What the comparison tables say, computed from per-seed results.json objects: the rows' labels, one accuracy per
seed (`accs`), where a gap to the raw input is made or lost (`decomposition`) and the claims table (`claims_table`),
each verdict from Welch's t-test over seeds. paper_tables.py writes them; nothing here runs a model.
"""
from __future__ import annotations

import statistics

from significance import finding, mean_std, welch

LABELS = {"fssuavl": "FSSUAVL (one model)", "image_only": "image-only model", "audio_only": "audio-only model",
          "centralised": "centralised bound (one client, all data, same budget)",
          "iid": "IID federation (same clients and budget)",
          "random_init": "random init", "raw_input": "raw input (standardised)"}
# the rows that split "no gain over the input" into recipe, federation and heterogeneity: FSSUAVL trained centrally on
# the pooled data with the federation's exact batches (configs/centralised.yaml), and federated on an IID partition
# (configs/iid.yaml); both train both modalities. The centralised run's budget is the FSSUAVL run's of its seed.
BOUNDS = ("centralised", "iid")


def accs(per_seed: list[dict], task: str, features: str, protocol: str, frac: float) -> list[float]:
    """One accuracy per seed from results.json objects (seeds missing that row give nothing)."""
    return [x["acc"] for r in per_seed for x in r["rows"] if x["task"] == task and x["features"] == features
            and x["protocol"] == protocol and x["label_frac"] == frac]


def decomposition(results: dict[str, list[dict]]) -> list[str]:
    """Where a gain over the raw input is made or lost, linear probe at each label fraction: the recipe (centralised
    bound vs the raw input), federating (IID federation vs centralised) and label skew (FSSUAVL's Dirichlet
    federation vs IID)."""
    steps = (("recipe", "centralised", "raw_input"), ("federation", "iid", "centralised"),
             ("heterogeneity", "fssuavl", "iid"))
    lines = []
    for m in ("image", "audio"):
        for frac in (1.0, 0.1, 0.01):
            for what, a, b in steps:
                va, vb = accs(results.get(a, []), m, m, "linear", frac), accs(results.get(b, []), m, m, "linear", frac)
                if va and vb:
                    lines.append(finding(f"{m.capitalize()}, linear probe, {frac:.0%} labels ({what})", LABELS[a], va,
                                         LABELS[b], vb))
    return lines


def claims_table(results: dict[str, list[dict]]) -> list[dict]:
    """The README's claims, computed: linear probe, Welch's t-test over seeds; "yes" only where the first side
    beats the second at p < 0.05, "no: below" where it loses at p < 0.05, else a tie."""
    rows = []

    def lin(v, m, frac, feats=None):
        return accs(results.get(v, []), m, feats or m, "linear", frac)

    def claim(text, va, vb):
        if not va or not vb:
            return
        pv = welch(va, vb)[2] if len(va) > 1 and len(vb) > 1 else None
        diff = statistics.mean(va) - statistics.mean(vb)
        verdict = ("no test (one seed)" if pv is None else "**yes**" if pv < 0.05 and diff > 0 else
                   "**no: below**" if pv < 0.05 else "no: a tie")
        rows.append({"claim": text, "verdict": verdict, "numbers": f"{mean_std(va)} vs {mean_std(vb)}",
                     "difference": round(diff, 2), "Welch p": None if pv is None else float(f"{pv:.3g}")})
    for m, raw in (("image", "pixels"), ("audio", "log-mel")):
        for frac in (1.0, 0.1):
            claim(f"FSSUAVL beats the raw {raw}, {m}, {frac:.0%} labels", lin("fssuavl", m, frac), lin("raw_input", m, frac))
    for m in ("image", "audio"):
        claim(f"one model beats the {m}-only model, {m}, 100% labels", lin("fssuavl", m, 1.0), lin(f"{m}_only", m, 1.0))
    for m in ("image", "audio"):
        claim(f"the recipe trained centrally beats the raw input, {m}, 100% labels", lin("centralised", m, 1.0),
              lin("raw_input", m, 1.0))
        claim(f"federated FSSUAVL beats its centralised bound ('below' is the federation's gap), {m}, 100% labels",
              lin("fssuavl", m, 1.0), lin("centralised", m, 1.0))
    claim("auxiliary audio helps: fused beats the image alone, paired task, 100% labels",
          lin("fssuavl", "paired", 1.0, "fused"), lin("fssuavl", "paired", 1.0, "image"))
    return rows

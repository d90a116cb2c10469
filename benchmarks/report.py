#!/usr/bin/env python
"""Turn pytest-benchmark JSON (``--benchmark-json``) into ``benchmarks/results/<device>.{json,md,png}``.

    python benchmarks/report.py raw.json [more.json ...] [--out benchmarks/results] [--slug nvidia-h100]

* ``<device>.json``: one flat record per measured case (timings, memory, throughput, checks: every
  ``extra_info`` key), the cases that did not run and why, the speed-ups and the targets, device and versions.
* ``<device>.md``: the key configurations with speed-ups of ``fast_imq_mmd`` over every baseline, the targets,
  time/memory tables per (mode, dtype, d), the other benchmarks (training step, gm_reparameterize), the skips.
* ``<device>.png``: log-log time vs n per provider, one panel per (mode, dtype, d).

Several input files are merged (a later file's case replaces an earlier one with the same name). Benchmarks
written by other files (e.g. ``bench_gm_reparam.py``) are listed generically under "Other benchmarks".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
from typing import Iterable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")

sys.path.insert(0, HERE)
from _names import BASELINES, FUSED  # noqa: E402
from _names import PROVIDERS as PROVIDER_ORDER  # noqa: E402
from _names import SHORT_LABELS as LABELS  # noqa: E402

SKIP_LABEL = {"too-large": "too large", "oom": "OOM", "too-slow": "too slow", "unavailable": "n/a", "error": "error"}

#: Key configurations (n, d, mode, dtype) per device type, and the targets evaluated there.
KEY_CONFIGS = {
    "cuda": [
        (4096, 64, "fwd+bwd", "fp32"),
        (65536, 10, "fwd+bwd", "fp32"),
        (4096, 10, "fwd+bwd", "fp32"),
        (16384, 64, "fwd+bwd", "fp32"),
        (4096, 64, "fwd+bwd", "bf16"),
    ],
    "cpu": [
        (4096, 10, "fwd+bwd", "fp32"),
        (2048, 10, "fwd+bwd", "fp32"),
        (2048, 10, "fwd", "fp32"),
        (65536, 10, "fwd+bwd", "fp32"),
        (4096, 64, "fwd+bwd", "fp32"),
    ],
}
#: (description, config, kind, argument, threshold): kind "time" = fused median <= threshold seconds,
#: "speedup" = baseline(s) median / fused median >= threshold (argument: baselines, the fastest one counts).
TARGETS = {
    "cuda": [
        ("fwd+bwd n=4096 d=64 <= 0.3 ms", (4096, 64, "fwd+bwd", "fp32"), "time", None, 0.3e-3),
        (
            ">= 20x eager (fastest of per-bandwidth, vectorised)",
            (4096, 64, "fwd+bwd", "fp32"),
            "speedup",
            ("per_bandwidth", "vectorised"),
            20.0,
        ),
        (">= 2x torch.compile", (4096, 64, "fwd+bwd", "fp32"), "speedup", ("compiled",), 2.0),
        (">= 2x KeOps", (4096, 64, "fwd+bwd", "fp32"), "speedup", ("keops",), 2.0),
        ("fwd+bwd n=65536 d=10 <= 60 ms", (65536, 10, "fwd+bwd", "fp32"), "time", None, 60e-3),
    ],
    "cpu": [
        (">= 2x torch.compile at n=4096 d=10 fwd+bwd", (4096, 10, "fwd+bwd", "fp32"), "speedup", ("compiled",), 2.0),
        (">= 2x torch.compile at n=4096 d=64 fwd+bwd", (4096, 64, "fwd+bwd", "fp32"), "speedup", ("compiled",), 2.0),
        (">= 6x KeOps at n=4096 d=10 fwd+bwd", (4096, 10, "fwd+bwd", "fp32"), "speedup", ("keops",), 6.0),
        (
            ">= 50x per-bandwidth at n=2048 (d=10 fwd+bwd)",
            (2048, 10, "fwd+bwd", "fp32"),
            "speedup",
            ("per_bandwidth",),
            50.0,
        ),
        (">= 50x per-bandwidth at n=2048 (d=10 fwd)", (2048, 10, "fwd", "fp32"), "speedup", ("per_bandwidth",), 50.0),
    ],
}


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", " ", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load(paths: Iterable[str]) -> dict:
    """Merge pytest-benchmark JSON files into ``{"raw": last file, "benchmarks": [...], "skipped": [...]}``."""
    benches, skipped, raw = {}, {}, None
    for p in paths:
        with open(p) as f:
            raw = json.load(f)
        for b in raw.get("benchmarks", []):
            benches[b.get("fullname", b.get("name"))] = b
        for s in (raw.get("gmwae_fast") or {}).get("skipped", []):
            skipped[s.get("nodeid", json.dumps(s, sort_keys=True))] = s
    if raw is None:
        raise SystemExit("report.py: no input file")
    for name in benches:  # a case that ran in a later file is no longer skipped
        skipped.pop(name, None)
    return {"raw": raw, "benchmarks": list(benches.values()), "skipped": list(skipped.values())}


def device_of(data: dict) -> dict:
    raw = data["raw"]
    dev = (raw.get("gmwae_fast") or {}).get("device") or (raw.get("machine_info") or {}).get("gmwae_fast_device")
    dev = dict(dev or {})
    if not dev.get("slug"):
        for b in data["benchmarks"]:
            if b.get("extra_info", {}).get("slug"):
                dev["slug"] = b["extra_info"]["slug"]
                dev.setdefault("device_name", b["extra_info"].get("device_name"))
                break
    if not dev.get("slug"):
        cpu = (raw.get("machine_info") or {}).get("cpu") or {}
        brand = cpu.get("brand_raw") or "unknown"
        dev["slug"] = f"cpu-{_slug(brand)}-{cpu.get('count', 0)}c"
        dev.setdefault("device_name", brand)
        dev.setdefault("device_type", "cpu")
    dev.setdefault("device_type", "cuda" if dev["slug"].startswith("nvidia") else "cpu")
    return dev


def records(data: dict) -> list[dict]:
    """One flat dict per measured benchmark: identity, stats (seconds) and every extra_info key."""
    out = []
    for b in data["benchmarks"]:
        st = b.get("stats") or {}
        rec = {"name": b.get("name"), "fullname": b.get("fullname"), "group": b.get("group")}
        rec.update(b.get("extra_info") or {})
        rec.setdefault("kind", "other")
        rec.update(
            median_s=st.get("median"),
            q1_s=st.get("q1"),
            q3_s=st.get("q3"),
            iqr_s=st.get("iqr"),
            mean_s=st.get("mean"),
            stddev_s=st.get("stddev"),
            min_s=st.get("min"),
            max_s=st.get("max"),
            rounds=st.get("rounds"),
            iterations=st.get("iterations", rec.get("iterations")),
        )
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------------


def _cfg(r: dict) -> tuple:
    return (r.get("n"), r.get("d"), r.get("mode"), r.get("dtype"))


def by_config(recs: list[dict]) -> dict:
    """``{(n, d, mode, dtype): {provider: record}}`` of the MMD benchmarks."""
    out: dict = {}
    for r in recs:
        if r.get("kind") == "imq_mmd" and r.get("median_s"):
            out.setdefault(_cfg(r), {})[r["provider"]] = r
    return out


def best_fused(provs: dict) -> Optional[dict]:
    cands = [provs[p] for p in FUSED if p in provs]
    return min(cands, key=lambda r: r["median_s"]) if cands else None


def speedups(cfgs: dict) -> list[dict]:
    rows = []
    for cfg in sorted(cfgs, key=lambda c: (c[3], c[2], c[1], c[0])):
        provs = cfgs[cfg]
        fused = best_fused(provs)
        if fused is None:
            continue
        row = {
            "n": cfg[0],
            "d": cfg[1],
            "mode": cfg[2],
            "dtype": cfg[3],
            "fused": fused["provider"],
            "fused_median_s": fused["median_s"],
        }
        for base in BASELINES:
            if base in provs:
                row[f"vs_{base}"] = provs[base]["median_s"] / fused["median_s"]
        rows.append(row)
    return rows


def skip_index(skipped: list[dict]) -> dict:
    return {
        (s.get("n"), s.get("d"), s.get("mode"), s.get("dtype"), s.get("provider")): s
        for s in skipped
        if s.get("kind") == "imq_mmd"
    }


def evaluate_targets(cfgs: dict, skips: dict, device_type: str) -> list[dict]:
    out = []
    for desc, cfg, kind, bases, thr in TARGETS.get(device_type, []):
        provs = cfgs.get(cfg, {})
        fused = best_fused(provs)
        row = {
            "target": desc,
            "n": cfg[0],
            "d": cfg[1],
            "mode": cfg[2],
            "dtype": cfg[3],
            "threshold": thr,
            "kind": kind,
        }
        if fused is None:
            row.update(status="not measured", measured=None, detail="no fused provider ran")
        elif kind == "time":
            ok = fused["median_s"] <= thr
            row.update(
                status="met" if ok else "NOT met",
                measured=fused["median_s"],
                detail=f"{LABELS[fused['provider']]} {_fmt_time(fused['median_s'])}",
            )
        else:
            have = [provs[b] for b in bases if b in provs]
            if not have:
                why = [
                    f"{LABELS[b]}: {SKIP_LABEL.get(skips[cfg + (b,)]['status'], skips[cfg + (b,)]['status'])}"
                    for b in bases
                    if cfg + (b,) in skips
                ]
                row.update(
                    status="not measured",
                    measured=None,
                    detail="baseline did not run" + (f" ({'; '.join(why)})" if why else ""),
                )
            else:
                base = min(have, key=lambda r: r["median_s"])
                sp = base["median_s"] / fused["median_s"]
                row.update(
                    status="met" if sp >= thr else "NOT met",
                    measured=sp,
                    detail=f"{LABELS[fused['provider']]} {_fmt_time(fused['median_s'])} vs "
                    f"{LABELS[base['provider']]} {_fmt_time(base['median_s'])}",
                )
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------------


def _fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale or unit == "us":
            v = s / scale
            return f"{v:.3g} {unit}" if v >= 1 or unit == "us" else f"{v:.2g} {unit}"
    return f"{s:.3g} s"


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


def _fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.3g}x" if v < 100 else f"{v:.0f}x")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _md_header(dev: dict, settings: dict, when: str, png_name: str) -> list[str]:
    bi = dev.get("build_info") or {}
    L = [f"# Benchmarks on {dev.get('device_name') or dev['slug']}", ""]
    L.append(
        f"Measured {when}; torch {dev.get('torch')}, triton {dev.get('triton')}, pykeops {dev.get('pykeops')}, "
        f"gmwae_fast {bi.get('version')} (cpu kernels: {bi.get('cpu_compiled')}, cuda kernels: "
        f"{bi.get('cuda_compiled')}), {dev.get('torch_threads')} torch threads on {dev.get('cpu_cores')} cores. "
        f"Sweep `{settings.get('sweep')}`."
    )
    L.append("")
    L.append(
        "Unbiased multi-bandwidth IMQ MMD² of `x` `(n, d)` against `y` `(n, d)`, 15 bandwidths "
        "`C_s = 2 d s` (`PAPER_SCALES`), uniform weights. `fwd` = value only (no autograd graph), "
        "`fwd+bwd` = value and gradient w.r.t. `x`. Times are medians of pytest-benchmark rounds "
        "(quartiles in the JSON), each call ending with a device synchronisation; compile/autotune time is "
        "excluded (`warmup_s` in the JSON). Peak memory: one separate untimed call (method in the JSON, "
        "`mem_method`). Speed-up = baseline median / fastest `fast_imq_mmd` backend median."
    )
    return L + ["", f"![time vs n]({png_name})", ""]


def _skip_cell(skips: dict, key: tuple) -> str:
    return SKIP_LABEL.get(skips[key]["status"], skips[key]["status"]) if key in skips else "-"


def _key_config_row(cfg: tuple, provs: dict, skips: dict, dtype_: str) -> list[str]:
    fused = best_fused(provs)
    row = [
        f"n={cfg[0]} d={cfg[1]} {cfg[2]} {cfg[3]}",
        f"{LABELS[fused['provider']]}: {_fmt_time(fused['median_s'])}, {_fmt_bytes(fused.get('peak_mem_bytes'))}"
        if fused
        else "-",
    ]
    for base in BASELINES:
        if base in provs and fused:
            row.append(
                f"{_fmt_x(provs[base]['median_s'] / fused['median_s'])} "
                f"({_fmt_time(provs[base]['median_s'])}, {_fmt_bytes(provs[base].get('peak_mem_bytes'))})"
            )
        else:
            row.append(_skip_cell(skips, cfg + (base,)))
    if fused and fused.get("sfu_fraction") is not None:
        row.append(f"{100 * fused['sfu_fraction']:.0f}%")
    elif dtype_ == "cuda":
        row.append("-")
    return row


def _md_key_configs(cfgs: dict, skips: dict, dtype_: str) -> list[str]:
    keys = [c for c in KEY_CONFIGS.get(dtype_, []) if c in cfgs]
    if not keys:
        return []
    rows = [_key_config_row(cfg, cfgs[cfg], skips, dtype_) for cfg in keys]
    header = ["config", "fast_imq_mmd (time, peak mem)"] + [f"vs {LABELS[b]}" for b in BASELINES]
    if dtype_ == "cuda":
        header.append("of SFU bound")
    return ["## Key configurations", ""] + _table(header, rows) + [""]


def _md_targets(targets: list[dict]) -> list[str]:
    if not targets:
        return []
    rows = [
        [
            t["target"],
            f"n={t['n']} d={t['d']} {t['mode']} {t['dtype']}",
            (_fmt_time(t["measured"]) if t["kind"] == "time" else _fmt_x(t["measured"]))
            if t["measured"] is not None
            else "-",
            t["status"],
            t["detail"],
        ]
        for t in targets
    ]
    return ["## Targets", ""] + _table(["target", "config", "measured", "status", "detail"], rows) + [""]


def _md_speedups(sp: list[dict]) -> list[str]:
    if not sp:
        return []
    rows = [
        [f"n={r['n']} d={r['d']} {r['mode']} {r['dtype']}", f"{LABELS[r['fused']]} {_fmt_time(r['fused_median_s'])}"]
        + [_fmt_x(r.get(f"vs_{b}")) for b in BASELINES]
        for r in sp
    ]
    return (
        ["## Speed-ups of fast_imq_mmd (all configurations)", ""]
        + _table(["config", "fastest fused"] + [f"vs {LABELS[b]}" for b in BASELINES], rows)
        + [""]
    )


def _provider_cell(r: Optional[dict], skips: dict, key: tuple) -> str:
    if not r:
        return _skip_cell(skips, key)
    cell = (
        f"{_fmt_time(r['median_s'])} [{_fmt_time(r.get('q1_s'))}-{_fmt_time(r.get('q3_s'))}], "
        f"{_fmt_bytes(r.get('peak_mem_bytes'))}"
    )
    if r.get("rel_err") is not None and r["rel_err"] > 1e-3:
        cell += f", value off by {100 * r['rel_err']:.2g}%"
    return cell


def _md_per_provider(cfgs: dict, skips: dict) -> list[str]:
    """Per (dtype, mode, d): rows n, columns providers."""
    if not cfgs:
        return []
    all_cfgs = set(cfgs) | {k[:4] for k in skips}
    present = [p for p in PROVIDER_ORDER if any(p in cfgs.get(c, {}) for c in cfgs)]
    L = ["## Time and peak memory per provider", ""]
    L.append(
        "Cells: median time [q1-q3], peak memory; pairs/s and SFU fraction in the JSON. "
        "`too large`: estimated footprint over the memory budget, not attempted; `OOM`: ran out of memory; "
        "`too slow`: call time extrapolated from a smaller n over `--bench-max-call-s`; "
        "`value off by`: relative error against the float64 reference when above 0.1% (low-precision "
        "baselines)."
    )
    L.append("")
    panels = sorted({(c[3], c[2], c[1]) for c in all_cfgs if c[0] is not None})
    for dt, mode, d in panels:
        ns = sorted({c[0] for c in all_cfgs if (c[3], c[2], c[1]) == (dt, mode, d)})
        if not any((n, d, mode, dt) in cfgs for n in ns):
            continue
        rows = [
            [str(n)]
            + [_provider_cell(cfgs.get((n, d, mode, dt), {}).get(p), skips, (n, d, mode, dt, p)) for p in present]
            for n in ns
        ]
        L += [f"### {mode}, {dt}, d={d}", ""] + _table(["n"] + [LABELS[p] for p in present], rows) + [""]
    return L


def _md_train_step(recs: list[dict]) -> list[str]:
    train = [r for r in recs if r.get("kind") == "train_step" and r.get("median_s")]
    if not train:
        return []
    ref = next((r for r in train if r.get("provider") == "reference"), None)
    r0 = train[0]
    L = [
        f"## One GM-WAE training step (B={r0.get('B')}, K={r0.get('K')}, d={r0.get('d')}, "
        f"m={r0.get('m')} prior samples)",
        "",
    ]
    L.append(
        f"Model: {r0.get('model')}. Encoder, reparameterisation, decoder of all B*K codes, weighted grouped "
        "MMD, backward and Adam step; only the MMD backend differs."
    )
    L.append("")
    rows = []
    for r in sorted(train, key=lambda r: r.get("provider") != "fused"):
        rows.append(
            [
                f"{r.get('provider')} (MMD backend `{r.get('mmd_backend')}`)",
                _fmt_time(r["median_s"]),
                f"{_fmt_time(r.get('q1_s'))}-{_fmt_time(r.get('q3_s'))}",
                _fmt_bytes(r.get("peak_mem_bytes")),
                _fmt_x(ref["median_s"] / r["median_s"]) if ref else "-",
            ]
        )
    return L + _table(["MMD", "median step", "q1-q3", "peak mem", "speed-up vs reference"], rows) + [""]


def _md_other(recs: list[dict]) -> list[str]:
    other = [r for r in recs if r.get("kind") not in ("imq_mmd", "train_step")]
    if not other:
        return []
    rows = []
    for r in sorted(other, key=lambda r: (str(r.get("group")), str(r.get("name")))):
        parts = [
            f"{k}={r[k]}" for k in ("provider", "backend", "mode", "B", "K", "d", "device") if r.get(k) is not None
        ]
        parts += [
            f"{k}={_fmt_bytes(v)}"
            for k, v in r.items()
            if k.endswith("_bytes") and k != "peak_mem_bytes" and isinstance(v, (int, float))
        ]
        note = ", ".join(parts)
        rows.append(
            [
                str(r.get("group")),
                str(r.get("name")),
                _fmt_time(r.get("median_s")),
                f"{_fmt_time(r.get('q1_s'))}-{_fmt_time(r.get('q3_s'))}",
                _fmt_bytes(r.get("peak_mem_bytes")),
                str(note).replace("|", "/"),
            ]
        )
    return (
        ["## Other benchmarks", ""]
        + _table(["group", "benchmark", "median", "q1-q3", "peak mem", "notes"], rows)
        + [""]
    )


def _md_not_measured(skipped: list[dict]) -> list[str]:
    non_plain = [s for s in skipped if s.get("status") != "unavailable"]
    unavailable = {}
    for s in skipped:
        if s.get("status") == "unavailable":
            unavailable.setdefault((s.get("provider"), s.get("reason")), 0)
            unavailable[(s.get("provider"), s.get("reason"))] += 1
    if not (unavailable or non_plain):
        return []
    L = ["## Not measured", ""]
    for (prov, reason), count in sorted(unavailable.items(), key=lambda kv: str(kv[0])):
        L.append(f"* `{prov}` unavailable ({count} cases): {reason}")
    for s in non_plain:
        L.append(
            f"* `{s.get('provider')}` n={s.get('n')} d={s.get('d')} {s.get('mode')} {s.get('dtype')}: "
            f"{SKIP_LABEL.get(s.get('status'), s.get('status'))} - {s.get('reason')}"
        )
    return L + [""]


def markdown(
    dev: dict,
    recs: list[dict],
    skipped: list[dict],
    sp: list[dict],
    targets: list[dict],
    settings: dict,
    when: str,
    png_name: str,
) -> str:
    """The report's Markdown: header, key configurations, targets, speed-ups, per-provider tables, the training
    step, other benchmarks and what was not measured (each section only when it has content)."""
    cfgs = by_config(recs)
    skips = skip_index(skipped)
    dtype_ = dev.get("device_type", "cpu")
    L = _md_header(dev, settings, when, png_name)
    L += _md_key_configs(cfgs, skips, dtype_) + _md_targets(targets) + _md_speedups(sp)
    L += _md_per_provider(cfgs, skips) + _md_train_step(recs) + _md_other(recs) + _md_not_measured(skipped)
    return "\n".join(L)


def plot(recs: list[dict], skipped: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = by_config(recs)
    panels = sorted({(c[3], c[2], c[1]) for c in cfgs}, key=lambda t: (t[0] != "fp32", t[0], t[1], t[2]))
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.text(0.5, 0.5, "no IMQ MMD results", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    rows_keys = sorted({(dt, mode) for dt, mode, _ in panels}, key=lambda t: (t[0] != "fp32", t[0], t[1]))
    ds = sorted({d for _, _, d in panels})
    fig, axes = plt.subplots(
        len(rows_keys), len(ds), figsize=(max(6.0, 4.2 * len(ds)), 3.2 * len(rows_keys) + 0.9), squeeze=False
    )
    colors = {p: plt.cm.tab10(i) for i, p in enumerate(PROVIDER_ORDER)}
    handles = {}
    for i, (dt, mode) in enumerate(rows_keys):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for p in PROVIDER_ORDER:
                pts = sorted((c[0], r[p]) for c, r in cfgs.items() if (c[3], c[2], c[1]) == (dt, mode, d) and p in r)
                if not pts:
                    continue
                n = [x for x, _ in pts]
                med = [r["median_s"] for _, r in pts]
                q1 = [r.get("q1_s") or r["median_s"] for _, r in pts]
                q3 = [r.get("q3_s") or r["median_s"] for _, r in pts]
                style = "-" if p in FUSED else "--"
                (h,) = ax.plot(n, med, style, marker="o", ms=3.5, color=colors[p], label=LABELS[p])
                ax.fill_between(n, q1, q3, color=colors[p], alpha=0.2, lw=0)
                handles[p] = h
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ns = sorted({c[0] for c in cfgs if (c[3], c[2], c[1]) == (dt, mode, d)})
            if ns:
                ax.set_xticks(ns)
                ax.set_xticklabels([str(v) for v in ns], fontsize=7)
            ax.set_title(f"{mode} {dt} d={d}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(rows_keys) - 1:
                ax.set_xlabel("n (= m)")
            if j == 0:
                ax.set_ylabel("median time [s]")
    order = [p for p in PROVIDER_ORDER if p in handles]
    ncol = min(len(order), max(2, 2 * len(ds)))
    legend_rows = math.ceil(len(order) / ncol)
    top_in = 0.3 + 0.2 * legend_rows
    height = fig.get_size_inches()[1]
    fig.legend(
        [handles[p] for p in order],
        [LABELS[p] for p in order],
        loc="upper center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
    )
    fig.suptitle(title, y=1 - 0.05 / height, fontsize=10, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - top_in / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------


def build_report(paths: list[str], out_dir: str = DEFAULT_OUT, slug: Optional[str] = None) -> dict:
    """Write ``<slug>.json``, ``<slug>.md`` and ``<slug>.png`` under ``out_dir``; returns their paths."""
    data = load(paths)
    dev = device_of(data)
    slug = slug or dev["slug"]
    recs = records(data)
    cfgs = by_config(recs)
    skips = skip_index(data["skipped"])
    sp = speedups(cfgs)
    targets = evaluate_targets(cfgs, skips, dev.get("device_type", "cpu"))
    raw = data["raw"]
    settings = (raw.get("gmwae_fast") or {}).get("settings") or {}
    when = raw.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat()
    os.makedirs(out_dir, exist_ok=True)
    paths_out = {k: os.path.join(out_dir, f"{slug}.{k}") for k in ("json", "md", "png")}
    summary = {
        "slug": slug,
        "device": dev,
        "datetime": when,
        "settings": settings,
        "commit_info": raw.get("commit_info"),
        "pytest_benchmark_version": raw.get("version"),
        "sources": [os.path.basename(p) for p in paths],
        "results": recs,
        "skipped": data["skipped"],
        "speedups": sp,
        "targets": targets,
    }
    with open(paths_out["json"], "w") as f:
        json.dump(summary, f, indent=1, sort_keys=False, default=str)
    with open(paths_out["md"], "w") as f:
        f.write(
            markdown(dev, recs, data["skipped"], sp, targets, settings, when, os.path.basename(paths_out["png"])) + "\n"
        )
    plot(
        recs,
        data["skipped"],
        paths_out["png"],
        f"fast_imq_mmd vs today's formulations - {dev.get('device_name') or slug}",
    )
    return paths_out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--slug", default=None, help="device slug naming the outputs (default: from the JSON)")
    a = ap.parse_args(argv)
    out = build_report(a.inputs, a.out, a.slug)
    for k in ("json", "md", "png"):
        print(f"wrote {out[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

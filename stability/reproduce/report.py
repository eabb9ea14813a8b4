"""``paper_report.md`` and ``paper_report.json``: per finding, the paper's words, the setting
beside the paper's, the mechanism line, each check's effect with its 95% interval, the
verdict and what would change it; the protocol's commit and its dated amendments."""

from __future__ import annotations

import datetime
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from stability import workdir as W
from stability.plots import summary_table
from stability.reproduce import figures
from stability.reproduce.presets import NAMES, PRESET, Preset
from stability.reproduce.stats import LEVEL, VERDICTS

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "docs" / "reproduce" / "protocol.md"


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def provenance() -> dict[str, Any]:
    """The checkout's commit, whether tracked files have uncommitted changes, the protocol's
    last commit and its amendments (the list under "## Amendments" in protocol.md)."""
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        protocol = git("log", "-1", "--format=%h %cs", "--", str(PROTOCOL)) or "uncommitted"
    except (OSError, subprocess.CalledProcessError):
        commit, dirty, protocol = "unknown", False, "unknown"
    return {"commit": commit, "dirty": dirty, "protocol": protocol, "amendments": amendments()}


def amendments(path: Path = PROTOCOL) -> list[str]:
    """The items of protocol.md's "## Amendments" section (each "- YYYY-MM-DD ...")."""
    if not path.is_file():
        return []
    out, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Amendments"
            continue
        if inside and line.startswith("- "):
            out.append(line[2:].strip())
        elif inside and line.startswith("  ") and out:
            out[-1] += " " + line.strip()
    return out


def _cell(text: str) -> str:
    """Text for a markdown table cell (a "|" would end the cell)."""
    return text.replace("|", "\\|")


def _interval(c: dict) -> str:
    if c["mean"] is None:
        return "–"
    if c["lo"] is None:
        return f"{c['mean']:+.3f} (1 seed)"
    return f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def _counts(checks: list[dict]) -> str:
    n = {
        k: sum(c["outcome"] == k for c in checks)
        for k in ("supported", "contradicted", "unresolved", "missing")
    }
    return ", ".join(f"{v} {k}" for k, v in n.items() if v)


def kind(verdict: str) -> str:
    """A verdict without its "(gated checks not tested ...)" qualifier."""
    return verdict.split(" (gated")[0]


def what_would_change(f: dict, p: Preset) -> str:
    """One sentence: what would move this verdict."""
    v = kind(f["verdict"])
    gated = (
        " A proxy in which the mechanism appears (larger models, longer runs or higher LRs, "
        "see above) would let its gated checks count."
    )
    if v.startswith("not tested"):
        return gated.strip()
    if v == "missing":
        return "Runs: the checks have no data."
    tested = [c for c in f["checks"] if c["lo"] is not None]
    if not tested:
        return "More seeds: no check has an interval yet."
    half = max((c["hi"] - c["lo"]) / 2 for c in tested)
    extra = gated if v != f["verdict"] else ""
    if v in ("supported", "contradicted"):
        return (
            f"An interval reaching 0: with {p.seeds} seeds the widest half-width is {half:.3g}; "
            "other data, sizes or seeds that shrink the effects below it would." + extra
        )
    return (
        f"Narrower intervals: the widest half-width is {half:.3g} with {p.seeds} seeds "
        f"(it shrinks about as 1/√n), or effects that grow with size or steps." + extra
    )


def _gist(name: str, p: Preset, data: str) -> list[tuple[str, str, str]]:
    """(aspect, the paper, here) rows: the setting beside the paper's, in short
    (docs/findings.md has the full tables with the quotes)."""
    sizes = ", ".join(f"d={d}·L={layer}" for d, layer, _ in p.sizes)
    common = [
        ("data", "C4, T5 SentencePiece (32,101 pieces), batch 256 × 512 tokens", data),
        ("steps, warm-up", "1e5, 5e3 (5%)", f"{p.steps}, {p.warmup:.0%}"),
        ("seeds", "one run per point", f"{p.seeds} per point: initialisation and data order"),
    ]
    rows = {
        "qk_sensitivity": [
            ("sizes", "width, depth and heads scaled together (figure only)", sizes),
            ("LRs", "3e-4 … 3e-1 (7)", f"{p.lrs[0]:g} … {p.lrs[-1]:g} ({len(p.lrs)})"),
        ],
        "logit_growth": [
            (
                "read at",
                "layer 0; step 2e3 (§3.3), over training (Fig. 2)",
                f"layer 0, peak over training; d={p.sizes[-1][0]}, lr={max(p.lrs):g}",
            )
        ],
        "z_loss": [
            (
                "model, LR",
                "2.4M parameters, LR 0.1 (Fig. 4); qk-LN; no weight decay",
                f"d={p.z_size[0]}·L={p.z_size[1]}, LR {', '.join(f'{x:g}' for x in p.z_lrs)}; "
                "qk-LN; no weight decay",
            ),
            ("steps", '1e5 (the drift comes "towards the end")', f"{p.z_steps}"),
        ],
        "warmup": [
            (
                "warm-up",
                "5e3 vs longer (lengths in the figure only), qk-LN",
                f"{p.warmup:.0%} vs {p.long_warmup:.0%} of training, qk-LN",
            ),
            ("sizes", "several (figure only)", f"d={p.sizes[0][0]} and d={p.sizes[-1][0]}"),
        ],
        "weight_decay": [
            ("decay", "independent λ=1e-4 vs coupled λ=0.1, qk-LN", "the same λs, qk-LN"),
            ("LR ranges", "coupled: the better of [1e-4, 1e-1] and [3e-4, 3e-1]", "the same"),
        ],
        "mup": [
            (
                "μParam",
                "simple: LR of linear layers × base-fan-in/fan-in; base width 256",
                f"the same (head included); base width {p.mup_widths[0]}",
            ),
            (
                "widths",
                "from 256 (figure only)",
                f"{p.mup_widths[0]} → {p.mup_widths[-1]} "
                f"({p.mup_widths[-1] // p.mup_widths[0]}×), {p.mup_layers} layers",
            ),
            (
                "LRs",
                "3e-4 … 3e-1 (and 1 with full μParam)",
                f"quarter decades {p.mup_lrs[0]:g} … {p.mup_lrs[-1]:g} ({len(p.mup_lrs)})",
            ),
        ],
        "eps": [
            (
                "ε",
                "1e-15 vs 1e-8 (vs 1e-6), 4.8B params, LR 0.3",
                f"the same εs, d={p.sizes[-1][0]}, LR {', '.join(f'{x:g}' for x in p.eps_lrs)}",
            ),
            (
                "grad RMS",
                "first MLP layer of block 0, mean of the last 500 steps",
                "the same layer, mean of the last 10% of logged steps",
            ),
        ],
    }
    return [*rows[name], *common]


def write_paper_report(
    findings: list[dict],
    rows: dict[str, list[dict]],
    workdir: W.PathLike,
    preset: str,
    *,
    planned: dict[str, int | None],
    partial: bool = False,
    seed_offset: int = 0,
    command: str = "",
) -> W.Path:
    """paper_report.md, paper_report.json and figures/<finding>.png in ``workdir``; the title
    says when the report is a smoke test (the tiny preset), partial (runs missing), or written
    from a tree with uncommitted changes."""
    workdir = W.path(workdir)
    p = PRESET[preset]
    (workdir / "figures").mkdir(parents=True, exist_ok=True)
    prov = provenance()
    missing = {n: None if planned[n] is None else planned[n] - len(rows.get(n, [])) for n in NAMES}
    partial = partial or any(m is None or m > 0 for m in missing.values())
    marks = [
        "smoke test of the machinery, not evidence" if preset == "tiny" else "",
        "partial: runs missing" if partial else "",
        "from a tree with uncommitted changes" if prov["dirty"] else "",
    ]
    marks = [m for m in marks if m]
    data = next((r["data"] for rs in rows.values() for r in rs), "–")
    seeds = f"{seed_offset}…{seed_offset + p.seeds - 1}"
    lines = [
        "# Reproducing Wortsman et al. 2023 (small-scale proxies)"
        + (f" — {'; '.join(marks)}" if marks else ""),
        "",
        f"Date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}. Commit: {prov['commit']}"
        + (" with uncommitted changes" if prov["dirty"] else "")
        + f". Command: `{command or f'stability reproduce --preset={preset} --workdir={workdir}'}`"
        + (" (the runs finished so far)." if partial else ".")
        + f" Protocol: `docs/reproduce/protocol.md` as of commit {prov['protocol']}"
        + f" ({len(prov['amendments'])} amendments, listed at the end).",
        "",
        f"Preset `{preset}`: {p.seeds} seeds per setting ({seeds}: each sets the initialisation "
        f"and the data order). Data: {data}.",
        "",
        "**How to read a check.** Each check is a claim of the paper that a difference D > 0. D "
        "is measured once per seed, its two arms sharing the seed (initialisation and batches). "
        f"The table gives the mean of D over seeds with its two-sided {LEVEL:.0%} Student-t "
        "interval (n − 1 degrees of freedom). The check is **supported** when the interval lies "
        "above 0, **contradicted** when it lies below 0, and **unresolved** when it contains "
        "0. The size, LR and step of every check are fixed by the protocol. A *gated* check "
        "tests the paper's explanation: it counts only where the finding's mechanism appears "
        "in these runs. A finding is **supported** or **contradicted** when all its counted "
        "checks are. It is **mixed** when some checks are supported and others contradicted, "
        "and **partly supported** or **partly contradicted** when some are and the rest are "
        "unresolved. It is **unresolved** when none is supported or contradicted. No "
        "correction is made for the number of checks; each is its own claim.",
        "",
        "| finding | mechanism in these runs | checks | verdict |",
        "|---|---|---|---|",
        *[
            f"| {f['claim']} | {_yes_no(f)} | {_counts(f['checks'])} | **{f['verdict']}** |"
            for f in findings
        ],
        "",
        "Verdicts: "
        + ", ".join(
            f"{k} {n}" for k in VERDICTS if (n := sum(kind(f["verdict"]) == k for f in findings))
        )
        + ".",
        "",
        "| sweep | finished runs / planned | diverged | stopped | training time (s, sum over "
        "chunks) |",
        "|---|---|---|---|---|",
    ]
    for name in NAMES:
        rs = rows.get(name, [])
        lines.append(
            f"| `{name}` | {len(rs)} / {'–' if planned[name] is None else planned[name]} | "
            f"{sum(r['diverged'] for r in rs)} | {sum(r.get('stopped', False) for r in rs)} | "
            f"{_chunk_seconds(rs):.0f} |"
        )
    for i, f in enumerate(findings, 1):
        fig = workdir / "figures" / f"{f['finding']}.png"
        figures.draw(f["finding"], rows, p, fig)
        gone = {s: missing[s] for s in f["sweeps"] if missing[s] is None or missing[s] > 0}
        lines += [
            "",
            f"## {i}. {f['claim']}",
            "",
            f"The paper: {f['paper']}",
            "",
            "| | the paper | here |",
            "|---|---|---|",
            *[f"| {a} | {paper} | {here} |" for a, paper, here in _gist(f["finding"], p, data)],
            "",
            f"**Mechanism** ({_yes_no(f)}): {f['mechanism']}.",
            "",
            f"Rule: {f['rule']}",
            "",
            "| check (D > 0 is the paper's direction) | source | D: mean [95% CI] (seeds) | outcome |",
            "|---|---|---|---|",
            *[
                f"| {_cell(c['check'])}{' (gated)' if c['gated'] else ''} | {c['source']} | "
                f"{_interval(c)} {c['unit']} ({c['n']}) | {c['outcome']}"
                f"{' (partial)' if c['partial'] else ''} |"
                for c in f["checks"]
            ],
            "",
            f"**Verdict: {f['verdict']}**"
            + (
                " (partial: "
                + ", ".join(
                    f"`{s}` {'has no plan' if m is None else f'misses {m} runs'}"
                    for s, m in gone.items()
                )
                + ")"
                if gone
                else ""
            )
            + (" — a smoke test, not evidence" if preset == "tiny" else "")
            + f". What would change it: {what_would_change(f, p)}",
            "",
            *f["details"],
            "",
        ]
        for s in f["sweeps"]:
            if rows.get(s):
                lines += [
                    f"Sweep `{s}`: final eval loss per LR (mean ± std over seeds; 'div': "
                    "diverged), LR sensitivity.",
                    "",
                    summary_table(rows[s]),
                    "",
                ]
        lines.append(f"![{f['finding']}](figures/{fig.name})")
    lines += ["", "## Amendments to the protocol", ""]
    lines += [f"- {a}" for a in prov["amendments"]] or ["None."]
    out = workdir / "paper_report.md"
    W.write_text(out, "\n".join(lines) + "\n")
    W.write_text(
        workdir / "paper_report.json",
        json.dumps(
            {
                "preset": preset,
                **prov,
                "partial": partial,
                "seed_offset": seed_offset,
                "findings": findings,
            },
            indent=1,
            default=_jsonable,
        )
        + "\n",
    )
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x).__name__)


def _chunk_seconds(rows: list[dict]) -> float:
    """Wall seconds of the chunks that trained ``rows`` (a chunk's runs share its time)."""
    return sum(w or 0.0 for _, w in {(r["data_seed"], r["wall_seconds"]) for r in rows})


def _yes_no(f: dict) -> str:
    if not any(c["gated"] for c in f["checks"]):
        return "no gate"
    present = f["mechanism_present"]
    return "unknown" if present is None else "yes" if present else "no"

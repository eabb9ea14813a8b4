# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Comparing stabilizers
#
# Reads one or more LR sweeps (`stability sweep --workdir=...`, or their W&B group) or single
# runs (`stability train --workdir=...`) and sets the stabilizer settings side by side on the
# instability signals of Wortsman et al. 2023 (*Small-scale proxies for large-scale
# Transformer training instabilities*):
#
# 1. LR sensitivity: final loss vs learning rate;
# 2. attention-entropy collapse over training;
# 3. attention-logit growth, and the max logit early in training as a warning signal;
# 4. output-logit divergence (mean log Z);
# 5. update size vs Adam's ε (§3.4);
# 6. attention-sink mass and the residual norm at position 0.
#
# Set the cell tagged `parameters` (below the imports; papermill overrides it too), then run
# all cells. Relative workdirs are read from the current folder, else from the repository
# root (the notebook's parent folder). Sweeps run with `--seeds=N` show each LR's spread over
# seeds in section 1; the per-run panels of the other sections show one seed.

# %%
import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

from stability import plots, results


def show(fig) -> None:
    """Display a figure as PNG, whatever matplotlib's backend, and free it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()))


def show_panels(rows, by, what, **kwargs) -> None:
    """One panel per setting of ``rows`` (long-form history), one curve per ``by`` value;
    says so when there is nothing to plot."""
    if rows.empty:
        print(f"Nothing to plot: the histories hold no {what}.")
        return
    show(plots.plot_panels(results.panels(rows, "label", by), **kwargs))


def workdir(path: str) -> Path:
    """``path``, or ``../path`` when only that exists (a notebook run from notebooks/)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (Path.cwd().parent / p).exists():
        return p
    return Path.cwd().parent / p


# %% tags=["parameters"]
WORKDIRS = ["runs/demo"]  # sweep or single-run workdirs (sweeps' settings get their name)
LR = 0.1  # learning rate of the per-run panels (the sweep's nearest LR is used)
EARLY_STEP = 2000  # step of the early-warning max attention logit (the paper's choice; runs
# that end earlier are read at their last logged step, which the figure's title then says)
PARAM = "blocks/0/mlp/fc1/kernel"  # parameter whose update and gradient RMS §5 plots
TARGET_PARAMS = 1e7  # §7: non-embedding parameters the forecast extrapolates to
FORECAST_STEP = None  # §7: step read (None: the end of the shortest run's schedule)
WANDB_PROJECT = ""  # set with WANDB_GROUP to read runs from W&B instead (needs network)
WANDB_GROUP = ""  # a sweep's W&B group is its name, e.g. "demo"
WANDB_ENTITY = None  # W&B entity (user or team); None: your default entity

# %%
KEYS = [
    "train/loss",
    "eval/loss",
    "logits/log_z_mean",
    "attn/*",
    "resid/*",
    f"update/rms/{PARAM}",
    f"grad/rms/{PARAM}",
    f"grad/rms_over_eps/{PARAM}",
]
if WANDB_PROJECT:
    table, hist = results.from_wandb(WANDB_PROJECT, WANDB_GROUP, WANDB_ENTITY, keys=KEYS)
else:
    dirs = [workdir(w) for w in WORKDIRS]
    table, hist = results.runs_table(dirs), results.histories(dirs, keys=KEYS)
grid = None if WANDB_PROJECT else results.planned_grid(dirs)  # each setting's planned LRs
lr = results.nearest_lr(table, LR)
display(table.drop(columns=["workdir", "run_id", "setting", "config", "diverged", "metrics_path"]))
print(f"{len(table)} runs, {table['label'].nunique()} setting(s); per-run panels at lr={lr:g}")
n_seeds = int(table.groupby(["label", "lr"])["seed"].nunique().max())
if n_seeds > 1:
    seed = int(table["seed"].min())
    hist = hist[hist["seed"] == seed]
    print(f"Up to {n_seeds} seeds per LR: section 1 uses all; the other panels show seed {seed}.")
at_lr = hist[np.isclose(hist["lr"], lr)]
unfinished = table[table["status"] == "unfinished"]
if len(unfinished):
    print(f"Unfinished (no results record yet): {', '.join(unfinished['run_id'])}")

# %% [markdown]
# ## 1. LR sensitivity

# %%
recs = results.records(table)
if recs:
    show(plots.plot_lr_sensitivity(recs, grid=grid))
    display(Markdown(plots.summary_table(recs, grid=grid)))
    no_l0 = sorted({r["setting"] for r in recs if r["loss_at_init"] is None and r["diverged"]})
    if no_l0:
        print(f"No loss at init (single runs) for {', '.join(no_l0)}: LR sensitivity n/a.")
else:
    print("No finished run yet.")
if recs and n_seeds > 1:
    spread = results.seed_spread(table)
    display(spread)
    split = spread[spread["disagree"]]
    print(
        "Seeds disagree at: "
        + (", ".join(f"{r.label} lr={r.lr:g}" for r in split.itertuples()) or "no LR")
        + f" (tolerance {plots.SEED_TOLERANCE:g} nats)"
    )

# %% [markdown]
# **Reading.** One curve per setting: final eval loss against the peak LR; a cross marks a
# diverged run, counted at the loss at initialisation ℓ0. LR sensitivity (legend and table) is
# the mean over the grid of min(loss, ℓ0) minus the best loss: how much the loss suffers away
# from the best LR. A stabilizer that works keeps the right end of its curve low where the
# baseline climbs back to ℓ0, and has the lower sensitivity. Compare settings on the same grid
# only; shift the grid if the optimum sits at its edge.
#
# With several seeds a point is the mean over seeds (bar: ± sample std), the sensitivity is
# computed per seed (legend and table: mean ± std), and the spread table lists each LR's
# seeds. A ring (table: †) marks an LR where the seeds disagree: some diverged and others did
# not, or their losses span more than the tolerance. At unstable LRs training is chaotic: tiny
# differences (a seed, float rounding that differs between vmap and sequential, or between
# hardware) grow into different outcomes, so a claim about such an LR needs several seeds.

# %% [markdown]
# ## 2. Attention-entropy collapse

# %%
show_panels(
    at_lr[at_lr["key"].str.startswith("attn/entropy_min/layer_")],
    "key",
    f"attn/entropy_min/layer_* at lr={lr:g}",
    ylabel="min over heads of attention entropy (nats)",
    suptitle=f"Attention entropy per layer, lr={lr:g}",
)

# %% [markdown]
# **Reading.** Per setting, the lowest per-head attention entropy of each layer over training,
# at the chosen LR. Entropy near 0 means one-hot attention: every query looks at one key. In
# the paper, runs without qk-layernorm at high LR collapse like this while the loss plateaus
# or diverges; a stabilizer that prevents the instability keeps the curves away from 0.

# %% [markdown]
# ## 3. Attention-logit growth

# %%
max_logit = results.over_layers(hist, "attn/max_logit", "max")
show_panels(
    max_logit,
    "lr",
    "attn/max_logit/layer_*",
    ylabel="max attention logit (max over layers)",
    logy=True,
    suptitle="Attention-logit growth",
)
early = results.value_at_step(max_logit, "attn/max_logit", EARLY_STEP)
if len(early):
    read = sorted(set(early["step"]))
    title = f"Max attention logit at step {EARLY_STEP}"
    if read != [EARLY_STEP]:
        last = int(table["steps"].max())
        why = f"the runs end at step {last}" if last < EARLY_STEP else "last logged step before"
        title += f"\nread at step {', '.join(map(str, read))} ({why})"
        print(f"EARLY_STEP={EARLY_STEP}: read at step {', '.join(map(str, read))} ({why}).")
    show(
        plots.plot_curves(
            results.curves(early, "label", x="lr"),
            title=title,
            xlabel="learning rate",
            ylabel="max attention logit",
            logx=True,
            logy=True,
            marker="o",
        )
    )
    steps_read = early.pivot_table(index="label", columns="lr", values="step", aggfunc="max")
    display(steps_read.rename_axis(columns="step read at lr"))

# %% [markdown]
# **Reading.** Top: the largest pre-softmax attention logit over training, one curve per LR.
# Without qk-layernorm it grows with the LR (through the norms of q and k); in the paper every
# run whose max logit passed 1e4 diverged. Bottom: its value at step `EARLY_STEP` (2,000; the
# title and the table give the step actually read for shorter runs) against the LR: the
# paper's early-warning signal, which grows long before the loss shows anything. Flat, low
# curves mean the stabilizer holds the logits in check.

# %% [markdown]
# ## 4. Output-logit divergence

# %%
show_panels(
    hist[hist["key"] == "logits/log_z_mean"],
    "lr",
    "logits/log_z_mean",
    ylabel="mean log Z of the output logits",
    suptitle="Output-logit divergence",
)

# %% [markdown]
# **Reading.** log Z, the log-normaliser of the output softmax, averaged over tokens. Output
# logit divergence shows as log Z drifting far from 0 (very negative in the paper) and the
# loss rising with it; it happens without weight decay at any size, and z-loss (a penalty on
# log² Z) holds log Z near 0.

# %% [markdown]
# ## 5. Update size and Adam's ε

# %%
show_panels(
    hist[hist["key"] == f"update/rms/{PARAM}"],
    "lr",
    f"update/rms/{PARAM}",
    ylabel="update RMS / LR",
    logy=True,
    suptitle=f"Update size of {PARAM}",
)
grad_over_eps = hist[hist["key"] == f"grad/rms_over_eps/{PARAM}"]
show_panels(
    grad_over_eps,
    "lr",
    f"grad/rms_over_eps/{PARAM}",
    ylabel="gradient RMS / Adam's ε",
    logy=True,
    hline=1.0,
    suptitle=f"Gradient RMS of {PARAM} relative to ε",
)
grad = hist[hist["key"] == f"grad/rms/{PARAM}"]
no_eps = sorted(set(grad["label"]) - set(grad_over_eps["label"]))
if no_eps:
    print(f"No grad/rms_over_eps for {', '.join(no_eps)} (an optimizer without ε): gradient RMS.")
    show_panels(
        grad[grad["label"].isin(no_eps)],
        "lr",
        f"grad/rms/{PARAM}",
        ylabel="gradient RMS",
        logy=True,
        suptitle=f"Gradient RMS of {PARAM}",
    )

# %% [markdown]
# **Reading.** §3.4 of the paper: Adam's update is m/(√v + ε), so once the gradient RMS falls
# to the order of ε (the dotted line at 1) the update shrinks with it and learning stalls; the
# paper saw gradient RMS fall with model size and LR, and the update RMS collapse after it
# (a smaller ε helped). Update RMS / LR is of order 1 for a healthy Adam step; a drop toward 0
# while the gradient nears ε is this failure. Runs frozen at divergence end early.

# %% [markdown]
# ## 6. Attention sinks and the residual norm at position 0

# %%
for name, ylabel in (
    ("attn/bos_mass", "attention weight on position 0"),
    ("resid/bos_norm_ratio", "‖h₀‖ / median ‖hₛ‖, s ≥ 1"),
):
    rows = at_lr[at_lr["key"].str.startswith(f"{name}/layer_")]
    if rows.empty:
        print(f"{name}/layer_* is not in the histories: these runs did not log it.")
        continue
    show_panels(rows, "key", f"{name}/layer_*", ylabel=ylabel, suptitle=f"{name}, lr={lr:g}")

# %% [markdown]
# **Reading.** Per layer, at the chosen LR: the mean attention weight on the first token, and
# the norm of the first token's residual stream over the median norm of the others. A sink
# (Guo et al. 2024) shows as attention mass piling onto position 0 while its residual norm
# grows to many times the others' (a massive activation). Compare how early, and how far,
# each setting's curves leave their values at the start of training.

# %% [markdown]
# ## 7. Scaling forecast across model sizes

# %%
from stability import forecast, forecast_report  # noqa: E402
from stability.config import ConfigError  # noqa: E402

fc = None
if WANDB_PROJECT:
    print("The forecast reads sweep workdirs (config.json of each run), not W&B.")
else:
    try:
        fc = forecast.forecast(dirs, TARGET_PARAMS, step=FORECAST_STEP, min_sizes=1)
    except ConfigError as e:
        print(f"No forecast: {e}")
if fc is not None:
    show(forecast_report.plot_forecast(fc))
    if len(fc["sizes"]) < 3:
        print(f"{len(fc['sizes'])} model size(s): measurements only; a fit needs 3 sizes.")
    display(Markdown(forecast_report.to_markdown(fc)))

# %% [markdown]
# **Reading.** `stability forecast` in the notebook (same functions, same numbers). Left panels:
# per setting, the max attention logit (max over layers) at the step read against the
# non-embedding parameter count, one colour per LR; a least-squares quadratic in log-log
# (solid over the measured sizes, dashed to the target), the prediction at the target with its
# 95% prediction interval, and the red 1e4 line above which every run of the paper diverged.
# Then gradient RMS / ε of the layer-0 query kernel against size (red line: ε is reached) and
# LR sensitivity and optimal LR against size. Crosses mark runs left out (diverged before the
# step, or non-finite). Sweeps over at least three sizes are needed for a fit; with four, the
# command's `--holdout-largest` checks the extrapolation against the largest.

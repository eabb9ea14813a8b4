"""Instability metrics from one step's intermediates, computed on device inside the step.

Key names are fixed (the sweep engine, the report and the notebook rely on them):

  train/loss              mean next-token cross-entropy (nats), without z-loss
  train/z_loss            z_loss weight · mean(log Z²)
  logits/log_z_mean/max   mean / max over tokens of log Z = logsumexp of the output logits
  logits/mean             mean output logit over tokens and the vocabulary (the quantity that
                          "diverges and becomes very negative" in Wortsman et al. §3.1.2)
  attn/max_logit/layer_i  max over heads, queries and keys of the scaled pre-softmax logit
  attn/entropy/layer_i    mean over heads of the mean row entropy (nats)
  attn/entropy_min/layer_i  min over heads of that per-head mean
  attn/bos_mass/layer_i   mean attention weight on position 0 (attention sinks)
  resid/bos_norm_ratio/layer_i  norm of position 0's residual state / median of the others'
  reparam/sigma|gamma/{layer}   σReparam's spectral norm estimate and learned scale
  train/{term}            extra loss terms the model returns (e.g. sink_decorrelation)
  train/loss_icl|markov   bigram-backcopy: loss at copy positions / at Markov positions
  grad/global_norm        global L2 norm of the gradient (before clipping)
  grad/rms/{path}         RMS of each parameter's gradient
  update/rms/{path}       RMS of each parameter's update divided by the current LR
  param/rms/{path}        RMS of each parameter (after the update)
  grad/rms_over_eps/{path}  Adam family: gradient RMS over ε (§3.4); spam/* SPAM diagnostics

With ``train.scan_layers`` a stacked variable's per-layer values leave the step as one [L]
array under a name holding ``{layer}`` (``grad/rms/blocks/{layer}/attn/q/kernel``), and the
loop's records carry them under the per-layer names above (:func:`expand_layers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# The logical name of the leading axis of the scanned blocks' stacked variables
# (``train.scan_layers``): ``blocks/attn/q/kernel`` [L, d, d] holds ``blocks/{i}/attn/q/kernel``.
LAYERS = "layers"


def leaf_paths(tree) -> list[str]:
    """'/'-joined key paths of a pytree's leaves, e.g. 'blocks/0/attn/q/kernel'."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_str(path) -> str:
    """'/'-joined names of a key path; NNX's trailing '.value' of a Variable is dropped."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def rms(x: jax.Array, axis: tuple[int, ...] | None = None) -> jax.Array:
    """Root mean square in float32, over ``axis`` (all axes by default)."""
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axis))


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def is_layer_stack(x) -> bool:
    """Whether ``x`` is a variable holding every block's value along a leading ``layers`` axis."""
    axes = x.get_metadata().get("logical_axes") if is_variable(x) else None
    return bool(axes) and axes[0] == LAYERS


def layer_path(path: str, i: int | str) -> str:
    """Layer ``i``'s path of a stacked variable: 'blocks/attn/q/kernel' → 'blocks/i/attn/q/kernel'."""
    head, _, rest = path.partition("blocks/")
    return f"{head}blocks/{i}/{rest}"


# A metric name holding LAYER has one value per layer (a trailing [L] axis), which
# :func:`expand_layers` names per layer on the host: the program then returns one array per
# metric of a stacked variable, not L scalars (which would grow the program with depth).
LAYER = "{layer}"


def expand_layers(metrics: dict) -> dict:
    """``metrics`` (one record's values) with every ``…{layer}…`` entry of values [L] replaced
    by L entries named for their layer, in place of it."""
    out = {}
    for name, value in metrics.items():
        if LAYER not in name:
            out[name] = value
            continue
        for i in range(value.shape[-1]):
            out[name.replace(LAYER, str(i))] = value[..., i]
    return out


def map_layout(fn, tree):
    """``fn(path, x, stacked)`` on every array of ``tree`` (same tree out): ``path`` as
    :func:`path_str` names it, ``stacked`` whether ``x`` has a leading ``layers`` axis (the
    rules that depend on a parameter's kind read its own dims, ``x.shape[stacked:]``)."""

    def one(p, x):
        where, stacked = path_str(p), is_layer_stack(x)
        return jax.tree.map(lambda a: fn(where, a, stacked), x)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_variable)


def matrices(tree):
    """True for each matrix or embedding of ``tree`` (its own ndim ≥ 2, a stacked layer axis
    aside), False for vectors and scalars: weight decay's mask and SPAM's sparse moments."""
    return map_layout(lambda path, x, stacked: x.ndim - stacked >= 2, tree)


def rms_by_path(prefix: str, tree, scale: jax.Array | float = 1.0) -> dict[str, jax.Array]:
    """{f'{prefix}/{path}': rms(leaf)·scale} for every leaf; a stacked variable gives the
    RMS of each layer, [L] under ``{prefix}/blocks/{layer}/...`` (:func:`expand_layers` names
    them as the per-layer layout does)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
        where = path_str(p)
        if not is_layer_stack(x):
            out[f"{prefix}/{where}"] = rms(x.get_value() if is_variable(x) else x) * scale
            continue
        v = x.get_value()
        out[f"{prefix}/{layer_path(where, LAYER)}"] = rms(v, tuple(range(1, v.ndim))) * scale
    return out


def expand_aux(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Metric records from the model's aux dict: [L] arrays become ``{name}/layer_{i}`` (but
    those named per layer on the host, :data:`LAYER`), scalars keep their name, and
    ``loss/{x}`` terms are logged as ``train/{x}``."""
    out = {}
    for name, value in aux.items():
        if name.startswith("loss/"):
            out[f"train/{name[5:]}"] = value
        elif value.ndim == 1 and LAYER not in name:
            for i in range(value.shape[0]):
                out[f"{name}/layer_{i}"] = value[i]
        else:
            out[name] = value
    return out


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

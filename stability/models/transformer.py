"""The one model: embed → L pre-norm blocks (attention, gelu MLP) → final norm → logits.

Defaults follow Wortsman et al. 2023: no biases, RoPE, MLP 4·d, untied embeddings, embedding
init normal(1/√d), other weights truncated normal with std 1/√fan_in. Every stabilizer is a
``ModelConfig`` field acting where it is read: ``linear`` and ``norm`` choose drop-in layers
(``layers.py``); attention score kind, local heads and logit cap act in ``attention.py``;
output-logit cap and the sink decorrelation loss act here.

``remat`` (``train.remat``) trades compute for activation memory in the backward pass:
"none" saves what autodiff needs; "block" recomputes each block from its input except the
outputs of its weight matmuls (q, k, v, o, fc1, fc2: ``dots_with_no_batch_dims_saveable``):
norms, RoPE, the [B, N, T, S] attention weights and gelu are recomputed; "full" saves nothing
inside a block but its input (``nothing_saveable``). ``scan`` (``train.scan_layers``) runs the
blocks as one ``lax.scan`` instead of an unrolled Python loop, with the blocks' variables
stored stacked (MaxText's ``scan_layers`` layout): ``blocks`` is one ``Block`` whose every
variable has a leading axis of logical name ``layers`` (:func:`stack_layers`), so nothing is
stacked or unstacked per step and the optimizer update is one op per kind of variable, not per
layer; XLA schedules one block's body, with its remat, L times, so compile time hardly grows
with depth and temporaries grow only by what remat keeps per block. Initial values equal the
per-layer layout's (the blocks are drawn one by one, then stacked); optimizer rules and metrics
read the ``layers`` axis (``stability.metrics``), and checkpoints convert between the layouts
(:func:`convert_layers`). The activations are
constrained to their logical shardings (``stability.sharding.constrain``): the residual stream
and logits split over the batch, heads, MLP hidden width and vocabulary over the model axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stability.config import ModelConfig, Remat
from stability.kernels.reference import apply_softcap
from stability.metrics import LAYER, LAYERS, is_variable, path_str
from stability.models.attention import Attention, rope_tables
from stability.models.layers import make_linear, make_norm
from stability.sharding import constrain

REMAT_POLICIES = {
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc1 = make_linear(cfg, cfg.d_model, hidden, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = make_linear(cfg, hidden, cfg.d_model, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x_MD: jax.Array, *, train: bool = True) -> jax.Array:
        h_MF = constrain(self.fc1(x_MD, train=train), ("batch", "mlp"))
        return self.fc2(jax.nn.gelu(h_MF), train=train)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(
        self, x_MD: jax.Array, B: int, T: int, rope, *, train: bool = True
    ) -> tuple[jax.Array, dict]:
        h_MD, stats = self.attn(self.attn_norm(x_MD, train=train), B, T, rope, train=train)
        x_MD = x_MD + h_MD
        return x_MD + self.mlp(self.mlp_norm(x_MD, train=train), train=train), stats


def bos_norm_ratio(h_BTD: jax.Array) -> jax.Array:
    """Mean over sequences of ‖h_0‖ / median over s >= 1 of ‖h_s‖ (1 for one-token sequences)."""
    norm_BT = jnp.linalg.norm(h_BTD.astype(jnp.float32), axis=-1)
    if norm_BT.shape[1] == 1:
        return jnp.ones((), jnp.float32)
    return (norm_BT[:, 0] / jnp.median(norm_BT[:, 1:], axis=1)).mean()


def sink_cos2(h_BTD: jax.Array) -> jax.Array:
    """Mean over sequences and positions s >= 1 of cos²(h_0, h_s) (0 for one-token sequences)."""
    h_BTD = h_BTD.astype(jnp.float32)
    u_BTD = h_BTD * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(h_BTD), -1, keepdims=True), 1e-12))
    cos_BT = jnp.einsum("BD,BTD->BT", u_BTD[:, 0], u_BTD[:, 1:])
    return jnp.mean(jnp.square(cos_BT)) if cos_BT.size else jnp.zeros((), jnp.float32)


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__(tokens_BT, train=...) -> (logits_BTV float32, aux)``.

    ``aux`` maps metric names to values computed on device (see ``stability.metrics.expand_aux``):
    arrays of shape [L] are per-layer (``attn/max_logit`` → ``attn/max_logit/layer_i``), scalars
    are logged as they are, and keys starting with ``loss/`` are extra loss terms that the
    train step adds to the objective. ``train=False`` (evaluation) must not update any state.

    Keys: ``attn/{max_logit,entropy,entropy_min,bos_mass}`` [L] (``attention.py``);
    ``resid/bos_norm_ratio`` [L]: per block output, mean over sequences of position 0's residual
    norm over the median of the other positions' norms; ``reparam/{sigma,gamma}/{layer}``
    (σReparam layers, e.g. ``reparam/sigma/blocks.0.attn.q``): σ(W) and γ of this step (scanned,
    one [L] array per σReparam layer of the block, ``reparam/sigma/blocks.{layer}.attn.q``, which
    ``stability.metrics.expand_layers`` names per layer);
    ``loss/sink_decorrelation`` (``sink_decorrelation`` λ > 0): λ·mean over the residual states
    between blocks (outputs of blocks 0…L−2, the reference's hidden states 1…L−1) of
    mean over sequences and positions s >= 1 of cos²(h_0, h_s).
    """

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: Remat = "none", scan: bool = False
    ):
        self.cfg, self.remat, self.scan = cfg, remat, scan
        D, V = cfg.d_model, cfg.vocab_size
        embed_VD = jax.random.normal(rngs.params(), (V, D), jnp.float32) * D**-0.5
        self.embed = nnx.Param(embed_VD, logical_axes=("vocab", "embed"))
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
        self.blocks = stack_layers(blocks) if scan else nnx.List(blocks)
        self.final_norm = make_norm(cfg, D)
        if not cfg.tie_embeddings:
            head_kind = "sigma_reparam" if cfg.sigma_reparam_head else "plain"
            self.head = make_linear(cfg, D, V, axes=("embed", "vocab"), rngs=rngs, kind=head_kind)

    def __call__(
        self, tokens_BT: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        (logits_BTV, aux), sown = nnx.capture(self._forward, nnx.Intermediate)(tokens_BT, train)
        return logits_BTV, aux | reparam_metrics(sown)

    def _scan_blocks(self, run_block, x_MD: jax.Array, rope, B: int, T: int):
        """The stacked blocks as one ``lax.scan``: (x_MD, [L] stats, [L] bos-norm ratios,
        [L] sink cos², {aux name: value} of what the blocks sow, named per layer). The blocks'
        updated state (σReparam's u, PowerNorm's φ) is written back stacked."""
        graphdef, state = nnx.split(self.blocks)

        def body(x_MD, state):
            block = nnx.merge(graphdef, state, copy=True)
            (x_MD, stats), sown = nnx.capture(run_block, nnx.Intermediate)(block, x_MD, rope)
            h_BTD = x_MD.reshape(B, T, -1)
            cos2 = sink_cos2(h_BTD) if self.cfg.sink_decorrelation else jnp.zeros((), jnp.float32)
            per_layer = (stats, bos_norm_ratio(jax.lax.stop_gradient(h_BTD)), cos2)
            return x_MD, (per_layer, nnx.state(block, nnx.Not(nnx.Intermediate)), sown)

        x_MD, (per_layer, state, sown) = jax.lax.scan(body, x_MD, state)
        nnx.update(self.blocks, state)
        return x_MD, per_layer, reparam_metrics(sown, "blocks", LAYER)  # [L]: one per layer

    def _forward(self, tokens_BT: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        B, T = tokens_BT.shape
        dtype = jnp.dtype(cfg.dtype)
        rope = rope_tables(T, cfg.d_model // cfg.n_heads, cfg.rope_base)
        x_MD = jnp.take(self.embed[...], tokens_BT.reshape(-1), axis=0).astype(dtype)
        x_MD = constrain(x_MD, ("batch", None))

        def run_block(block: Block, x_MD: jax.Array, rope) -> tuple[jax.Array, dict]:
            x_MD, stats = block(x_MD, B, T, rope, train=train)
            return constrain(x_MD, ("batch", None)), stats

        if self.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.remat])
        if self.scan:
            x_MD, per_layer, sown_aux = self._scan_blocks(run_block, x_MD, rope, B, T)
            stats, bos_ratio_L, cos2_L = per_layer
        else:
            sown_aux = {}
            layer_stats, bos_ratio, cos2 = [], [], []
            for block in self.blocks:
                x_MD, st = run_block(block, x_MD, rope)
                layer_stats.append(st)
                bos_ratio.append(bos_norm_ratio(x_MD.reshape(B, T, -1)))
                if cfg.sink_decorrelation:
                    cos2.append(sink_cos2(x_MD.reshape(B, T, -1)))
            stats = {k: jnp.stack([st[k] for st in layer_stats]) for k in layer_stats[0]}
            bos_ratio_L = jnp.stack(bos_ratio)
            cos2_L = jnp.stack(cos2) if cos2 else None
        x_MD = self.final_norm(x_MD, train=train)
        if cfg.tie_embeddings:
            logits_MV = jnp.dot(x_MD, self.embed[...].astype(dtype).T)
        else:
            logits_MV = self.head(x_MD, train=train)
        logits_MV = constrain(logits_MV.astype(jnp.float32), ("batch", "vocab"))
        if cfg.logit_multiplier != 1.0:  # μParam (full): base_d/d
            logits_MV = logits_MV * cfg.logit_multiplier
        logits_MV = apply_softcap(logits_MV, cfg.logit_softcap or None)

        aux = {f"attn/{k}": v for k, v in stats.items()} | sown_aux
        aux["resid/bos_norm_ratio"] = jax.lax.stop_gradient(bos_ratio_L)
        if cfg.sink_decorrelation:  # the residual states between blocks: outputs of 0…L−2
            aux["loss/sink_decorrelation"] = cfg.sink_decorrelation * cos2_L[:-1].mean()
        return logits_MV.reshape(B, T, -1), aux


def reparam_metrics(sown, *where) -> dict[str, jax.Array]:
    """``reparam/{sigma,gamma}/{layer}`` of what σReparam layers sowed (``reparam_sigma``,
    ``reparam_gamma``; their last value), the layer named by its module path (after ``where``)
    joined by dots: ``reparam/sigma/blocks.0.attn.q``."""
    out = {}
    for path, values in nnx.to_flat_state(sown):
        layer = ".".join(map(str, (*where, *path[:-1])))
        out[f"reparam/{path[-1].removeprefix('reparam_')}/{layer}"] = values.get_value()[-1]
    return out


def stack_layers(blocks: list[Block]) -> Block:
    """One ``Block`` holding ``blocks``' variables stacked along a leading ``layers`` axis (the
    logical name prepended to each variable's ``logical_axes``)."""

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        axes = vs[0].get_metadata().get("logical_axes") or (None,) * jnp.ndim(vs[0].get_value())
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), logical_axes=(LAYERS, *axes))

    states = [nnx.state(b) for b in blocks]
    return nnx.merge(nnx.graphdef(blocks[0]), jax.tree.map(stack, *states, is_leaf=is_variable))


def convert_layers(tree, like, axis: int = 0):
    """``tree`` (a train state, or any tree holding a model's variables by path) in the layout
    of ``like`` (same kind of tree, abstract or concrete): per-layer (``blocks/{i}/...``) to
    stacked (``blocks/...`` with the ``layers`` axis at ``axis``: 1 under a sweep's run axis) or
    back. Values are moved, never changed; leaves outside the blocks are taken as they are."""
    src = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)

    def value(path: str, shape) -> jax.Array:
        if path in src:
            return src[path]
        parts = path.split("/")
        k = parts.index("blocks") + 1
        if parts[k].isdigit():  # a layer of a stacked source
            x = src["/".join(parts[:k] + parts[k + 1 :])]
            same = x.shape == shape  # no layer axis (e.g. Adafactor's unfactored placeholder)
            return x if same else jax.lax.index_in_dim(x, int(parts[k]), axis, keepdims=False)
        first = src["/".join([*parts[:k], "0", *parts[k:]])]
        if first.shape == shape:
            return first
        layers = ["/".join([*parts[:k], str(i), *parts[k:]]) for i in range(shape[axis])]
        return jnp.stack([src[p] for p in layers], axis)

    return jax.tree.unflatten(treedef, [value(path_str(p), x.shape) for p, x in paths])

"""Coupled weight decay (Wortsman et al. 2023 §3.2.2, Figure 6; qk-layernorm on): AdamW's
θ ← θ − η_t·(Δ + λθ) with the paper's λ = 0.1 at the largest size of the sizes family, over the
union of the paper's two LR ranges [1e-4, 1e-1] ∪ [3e-4, 3e-1]. The independent arm (λ = 1e-4,
θ ← θ − η_t·Δ − (η_t/η)·λθ) is the sizes sweep's. ARG: PRESET[,steps=N]
(``stability.reproduce.presets``)."""

from stability.reproduce.presets import points

NAME = "weight_decay"


def get_sweep(arg: str = "cpu"):
    return points(NAME, arg)

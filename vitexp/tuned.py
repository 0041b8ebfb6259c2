"""The tuned (lr, wd) of the built-in models: where each value comes from, and which model takes
which. A study's preset overrides them ([tuned.MODEL]); a preset's own models have none here."""

from __future__ import annotations

# [EC] Table 4 (tuned at 50 epochs), lr at batch 2048
_REGNETY = {"adamw": (3.8e-3, 0.1), "sgd": (2.54, 2.4e-5)}
_VIT_P_SMALL = {"adamw": (2.0e-3, 0.20), "sgd": (1.9, 1.3e-5)}  # ViT_P-1GF and 4GF
_VIT_18GF = {"adamw": (1.0e-3, 0.24), "sgd": (1.1, 1.2e-5)}
_VIT_C_1GF = {"adamw": (2.5e-3, 0.19), "sgd": (1.9, 1.3e-5)}
_VIT_C_4GF = {"adamw": (1.0e-3, 0.24), "sgd": (1.3, 2.2e-5)}
_VIT_C_18GF = {"adamw": (1.0e-3, 0.24), "sgd": (1.1, 2.7e-5)}
# The small family's (25-200 MF, 32 px): the best sample of the random search
# experiments/tune_shapes.toml (3 epochs of 5,000 shapes images; experiments/README.md)
_SMALL_VIT_P = {"adamw": (1.2e-2, 0.25), "sgd": (2.4, 2.5e-4)}
_SMALL_VIT_C = {"adamw": (3.5e-2, 0.04), "sgd": (0.66, 2.5e-4)}
_SMALL_CNN = {"adamw": (7.0e-2, 0.04), "sgd": (0.88, 4e-5)}
# the ResNets' own search (resnet_25mf) drew the same samples as RegNetY's (same ranges and
# sample seed) and its best were the same pairs
_SMALL_RESNET = {"adamw": (7.0e-2, 0.04), "sgd": (0.88, 4e-5)}
# The 7mf level's own search at the default studies' budget, experiments/tune_shapes.toml
# (16-32 samples per pair, 10 epochs of 3,000 shapes images; results/tune_shapes)
_VIT_P_7MF = {"adamw": (8.0e-3, 0.035), "sgd": (2.4, 8.9e-5)}
_VIT_C_7MF = {"adamw": (3.8e-2, 0.017), "sgd": (2.4, 8.9e-5)}
_RESNET_7MF = {"adamw": (0.39, 0.19), "sgd": (8.5, 5.5e-4)}

# model -> optimizer -> (lr at batch 2048, wd); where a comment in vitexp/models/registry.py says
# a model takes another level's values, it is so here
TUNED: dict[str, dict[str, tuple[float, float]]] = {
    "vit_p_1gf": _VIT_P_SMALL, "vit_c_1gf": _VIT_C_1GF, "vit_p_4gf": _VIT_P_SMALL, "vit_c_4gf": _VIT_C_4GF,
    "vit_p_18gf": _VIT_18GF, "vit_c_18gf": _VIT_C_18GF, "vit_p_36gf": _VIT_18GF, "vit_c_36gf": _VIT_C_18GF,
    "regnety_1gf": _REGNETY, "regnety_4gf": _REGNETY, "regnety_16gf": _REGNETY, "regnety_32gf": _REGNETY,
    "resnet50": _REGNETY, "resnet101": _REGNETY, "vit_p_7mf": _VIT_P_7MF, "vit_c_7mf": _VIT_C_7MF,
    "resnet_7mf": _RESNET_7MF, "vit_p_7mf_h2": _VIT_P_7MF, "vit_c_7mf_h2": _VIT_C_7MF,
    "vit_p_7mf_h4": _VIT_P_7MF, "vit_c_7mf_h4": _VIT_C_7MF, "vit_p_25mf": _SMALL_VIT_P,
    "vit_c_25mf": _SMALL_VIT_C, "regnety_25mf": _SMALL_CNN, "resnet_25mf": _SMALL_RESNET,
    "vit_p_50mf": _SMALL_VIT_P, "vit_c_50mf": _SMALL_VIT_C, "regnety_50mf": _SMALL_CNN,
    "resnet_50mf": _SMALL_RESNET, "vit_p_200mf": _SMALL_VIT_P, "vit_c_200mf": _SMALL_VIT_C,
    "regnety_200mf": _SMALL_CNN, "resnet_200mf": _SMALL_RESNET, "vit_p_7mf_p16": _VIT_P_7MF,
    "vit_c_7mf_p16": _VIT_C_7MF, "vit_p_25mf_p8": _VIT_P_7MF, "vit_c_25mf_p8": _VIT_C_7MF,
    "hybrid_7mf": _VIT_C_7MF, "hybrid_25mf": _SMALL_VIT_C, "hybrid_50mf": _SMALL_VIT_C,
    "hybrid_200mf": _SMALL_VIT_C, "hybrid_r50_vit_b16": _VIT_18GF,
}

"""The reproduction's variants and validation grids (paper 5.4, 5.6, 5.7).

:data:`VARIANTS` names every row of Table 2 (main), Table 4 (ablation) and Fig. 3 (universality)
with its config overrides; :data:`GRIDS` / :data:`PEER_GRIDS` / :data:`OPTIONS` are the bounded
validation search each model gets (the same number of trials for every model). A grid setting is a
dict of config overrides plus ``_lambda_scale`` (the paper's CL loss weights times a scale), which
:func:`expand` turns into a config.
"""
from __future__ import annotations

from micrec_tf.config import CL_TASKS, Config

ALL_CL = list(CL_TASKS)
PEER_MODEL = "tfrs_two_tower"  # model.name of the TFRS peer (in-batch negatives, no CL)
# name -> (table, overrides). Tables: main (Table 2), ablation (Table 4), universality (Fig. 3).
VARIANTS = {
    "FM": ("main", {"model.name": "fm", "model.cl": []}),
    "YoutubeDNN": ("main", {"model.name": "youtubednn", "model.cl": []}),
    "DeepFM": ("main", {"model.name": "deepfm", "model.cl": []}),
    "AutoInt": ("main", {"model.name": "autoint", "model.cl": []}),
    "ICAN": ("main", {"model.name": "ican", "model.cl": []}),
    "TFRS two-tower": ("main", {"model.name": PEER_MODEL, "model.cl": []}),
    "RFM* (fea)": ("main", {"model.name": "ican", "model.cl": ["feature"]}),
    "MicRec (fea+sess)": ("main", {"model.name": "ican", "model.cl": ["feature", "session"]}),
    "MicRec (final)": ("main", {"model.name": "ican", "model.cl": ALL_CL}),
    "MicRec - fea": ("ablation", {"model.name": "ican", "model.cl": ["semantic", "session"]}),
    "MicRec - sem": ("ablation", {"model.name": "ican", "model.cl": ["feature", "session"]}),
    "MicRec - sess": ("ablation", {"model.name": "ican", "model.cl": ["feature", "semantic"]}),
    "MicRec - all (ICAN)": ("ablation", {"model.name": "ican", "model.cl": []}),
    **{f"{base} + {short}": ("universality", {"model.name": base.lower(), "model.cl": [task]})
       for base in ("YoutubeDNN", "AutoInt")
       for short, task in (("fea", "feature"), ("sem", "semantic"), ("sess", "session"))},
}
FINAL = "MicRec (final)"
BASE = "ICAN"
SPARSITY = (1.0, 0.5, 0.2)

# The bounded validation grid (the same number of trials for every variant). Models without CL
# search the learning rate and the number of sampled negatives. A model with CL terms starts from
# the setting its base model (the same towers without CL) chose, so it never gets a training
# setting its base did not, and searches only the CL knobs: the paper's setting (dot-product
# similarity, tau 1, lambdas 1.0 / 0.3 / 0.1) and cosine similarity at a few temperatures and
# scales of the paper's lambdas (the region docs/results/ml-100k-investigation-similarity.md
# found on ml-100k's validation split).
_PAPER_CL = {"loss.cl_similarity": "dot", "loss.temperature": 1.0, "_lambda_scale": 1.0}


def _cosine(tau: float, scale: float) -> dict:
    return {"loss.cl_similarity": "cosine", "loss.temperature": tau, "_lambda_scale": scale}


GRIDS = {
    "full": ([_PAPER_CL, _cosine(0.2, 0.1), _cosine(0.2, 0.3), _cosine(0.5, 1.0)],
             [{"train.learning_rate": lr, "loss.num_negatives": n}
              for lr in (0.001, 0.003) for n in (500, 1000)]),
    # Two trials each.
    "small": ([_cosine(0.2, 0.1), _cosine(0.5, 1.0)],
              [{"train.learning_rate": lr} for lr in (0.001, 0.003)]),
    "none": ([{}], [{}]),
}
# The TFRS peer has no sampled negatives to tune: its negatives are the batch's other positives,
# so the batch size takes their place (the same number of trials as every other model).
PEER_GRIDS = {
    "full": [{"train.learning_rate": lr, "train.batch_size": b}
             for lr in (0.001, 0.003) for b in (1024, 4096)],
    "small": [{"train.learning_rate": lr} for lr in (0.001, 0.003)],
    "none": [{}],
}
# One method option per model, chosen on validation after its grid (seed 0, at the grid's
# chosen setting), so every model gets the same number of trials (grid + 1): the main loss's
# history mask for models without CL, semantic CL's positives for models with it.
OPTIONS = {
    "base": ("loss.mask_history_negatives", False),
    "cl": ("loss.semantic_positives", "all"),
    # The TFRS peer has no sampled negatives to mask: its extra trial doubles its in-batch
    # negatives instead (batch 8192).
    "peer": ("train.batch_size", 8192),
}
GRID_TEXT = {
    "full": "models without CL: learning rate {0.001, 0.003} x sampled negatives {500, 1000}; "
            "the TFRS peer: learning rate {0.001, 0.003} x batch size (its in-batch negatives) "
            "{1024, 4096}; models with CL terms: their base model's chosen setting plus either the "
            "paper's CL setting (dot product, tau 1, lambdas 1.0 / 0.3 / 0.1) or cosine "
            "similarity at (tau 0.2, lambdas x0.1), (tau 0.2, x0.3) or (tau 0.5, x1). Four trials "
            "each, then one method option each at the chosen setting, kept if it is better on "
            "validation: the main loss without the history mask (models without CL), semantic CL "
            "over all title neighbours (models with semantic CL), batch 8192 (the TFRS peer).",
    "small": "models without CL: learning rate {0.001, 0.003}; models with CL terms: their base "
             "model's chosen setting plus cosine CL similarity at (tau 0.2, the paper's lambdas "
             "1.0 / 0.3 / 0.1 x0.1) or (tau 0.5, x1). Two trials each, then the method option of "
             "the full grid; everything else at the config's values.",
    "none": "no tuning: every variant at the config's values.",
}


def grid_for(overrides: dict, grid: str = "full") -> list:
    cl_grid, base_grid = GRIDS[grid]
    if overrides.get("model.name") == PEER_MODEL:
        return PEER_GRIDS[grid]
    return cl_grid if overrides.get("model.cl") else base_grid


def option_for(overrides: dict, grid: str = "full"):
    """(config key, alternative value) tried after the grid, or None (grid ``none``)."""
    if grid == "none":
        return None
    if overrides.get("model.name") == PEER_MODEL:
        return OPTIONS["peer"]
    cl = overrides.get("model.cl") or []
    if not cl:
        return OPTIONS["base"]
    return OPTIONS["cl"] if "semantic" in cl else None


def base_of(overrides: dict) -> str | None:
    """The variant with the same towers and no CL terms (None for a model without CL)."""
    if not overrides.get("model.cl"):
        return None
    for name, (_, ov) in VARIANTS.items():
        if ov["model.name"] == overrides["model.name"] and not ov["model.cl"]:
            return name
    raise ValueError(f"no base variant without CL for model {overrides['model.name']!r}")


def canonical_name(name: str) -> str:
    """The first variant with the same model as ``name`` ("MicRec - sem" -> "MicRec (fea+sess)"):
    its runs are kept under that name, so rows that are the same model share one cache."""
    return next(n for n, (_, ov) in VARIANTS.items() if ov == VARIANTS[name][1])


def scaled_lambdas(scale: float) -> dict:
    """The paper's loss weights (1.0, 0.3, 0.1) times ``scale``, as config overrides."""
    return {"loss.lambda_feature": round(1.0 * scale, 6),
            "loss.lambda_semantic": round(0.3 * scale, 6),
            "loss.lambda_session": round(0.1 * scale, 6)}


def expand(cfg: Config, overrides: dict) -> Config:
    """``cfg`` with a variant's overrides and grid setting applied (``_lambda_scale`` becomes the
    three CL loss weights, :func:`scaled_lambdas`)."""
    ov = {k: v for k, v in overrides.items() if not k.startswith("_")}
    scale = overrides.get("_lambda_scale")
    if scale is not None:
        ov.update(scaled_lambdas(scale))
    return cfg.replace(ov)

"""The run cache of the reproduction: one small JSON per finished run, reused on the next call.

:class:`Runner` trains one run per (variant, setting, seed), or loads it from the committed cache
(``docs/results/runs/<name>/<key>.json``) when the cached run's config signature
(:func:`run_signature`) and the artifacts' fingerprint (:func:`artifacts_fingerprint`) match
today's. Cache keys are built by :func:`slug` from the variant's name and its grid setting
(``tune/<variant>/<setting>``, ``<variant>/seed<s>``): renaming either re-runs the work.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time

from micrec_tf.config import CL_TASKS, Config, from_dict

from experiments.variants import expand, grid_for, option_for


def run_signature(cfg: Config) -> dict:
    """What a cached run must match to be reused: the whole config except the keys that do not
    change a run's result (where runs are kept, how many seeds the report uses, export, the
    speed-only code paths of the user tower and of session CL's membership test, the
    multi-worker failure timeout)."""
    return _normalise(cfg.to_dict())


# Loss keys and the CL terms that read them: irrelevant to a run with none of those terms.
_CL_LOSS_KEYS = (
    ({"feature"}, ("lambda_feature", "feature_dropout", "mask_ratio")),
    ({"semantic"}, ("lambda_semantic", "semantic_positives")),
    ({"session"}, ("lambda_session", "same_category_weight", "session_positives",
                   "session_negative_pool")),
    ({"semantic", "session"}, ("num_cl_negatives",)),
    (set(CL_TASKS), ("temperature", "cl_similarity", "cl_anchors")),
)


def _rounded(value):
    """Floats rounded to 9 significant digits (0.1 * 0.3 and 0.03 are the same setting)."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _normalise(sig: dict) -> dict:
    sig = _rounded(json.loads(json.dumps(sig)))  # a deep copy, float noise rounded away
    sig.pop("export", None)
    sig.get("train", {}).pop("runs_dir", None)
    sig.get("eval", {}).pop("seeds", None)
    for key in ("history_embeddings", "attention"):  # speed only: the same function
        sig.get("model", {}).pop(key, None)
    sig.get("loss", {}).pop("session_membership", None)  # speed only: the same draws
    sig.get("train", {}).pop("collective_timeout_s", None)  # failure detection only
    tasks = set(sig.get("model", {}).get("cl") or [])
    for readers, keys in _CL_LOSS_KEYS:
        if not tasks & readers:
            for key in keys:
                sig.get("loss", {}).pop(key, None)
    return sig


def cached_signature(cached: dict):
    """The signature of a cached run, re-normalised through today's config: keys added since the
    run take their defaults (which keep the old behaviour), so such runs still match."""
    if "config" not in cached:
        return None
    return run_signature(from_dict(cached["config"]))


def artifacts_fingerprint(artifacts_dir: str) -> dict:
    """The counts of the preprocessing output a run trained on (stats.json without timings), so a
    cached run is not reused on artifacts that were rebuilt differently (another tie rule, another
    co-occurrence table)."""
    path = os.path.join(artifacts_dir, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        stats = json.load(fh)
    return {k: v for k, v in sorted(stats.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not any(t in k for t in ("second", "wall", "time", "_s"))}


_UNSET = object()


def slug(text: str) -> str:
    """A cache-key part from free text: alphanumerics kept, everything else ``_``, lower case."""
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


class Runner:
    """Runs (or loads from the committed cache) one training run per (variant, setting, seed).

    ``root``: where runs train (checkpoints; ``runs/<name>/reproduce``, not committed).
    ``cache_dir``: one small JSON per finished run (config signature, seed, per-epoch validation,
    best epoch, test metrics), meant to be committed (``docs/results/runs/<name>/``), so that a
    reproduction continues on another machine instead of re-running what is done. A cached run is
    reused only when its config signature and the artifacts' fingerprint match.
    """

    def __init__(self, cfg: Config, root: str, grid: str = "full", log=print,
                 cache_dir: str | None = None, cached_only: bool = False, select=None,
                 select_name: str | None = None):
        self.cfg, self.root, self.grid, self.log = cfg, root, grid, log
        # select(run) -> the validation score a tuning trial is chosen by (default: validation
        # HIT@N[0]; the cold-start reproduction reads cold-validation HIT@50).
        n = cfg.eval.hit_n[0]
        self.select = select or (lambda res: res["valid"][f"hit@{n}"])
        self.select_name = select_name or f"validation HIT@{n}"
        # cached_only: never train; a run not in the cache is recorded in ``missing`` and
        # returns None (a partial report of what is done).
        self.cached_only, self.missing = cached_only, []
        self.cache_dir = cache_dir or os.path.join(root, "cache")
        self.run_seconds = {}  # run key -> training seconds, cached runs included
        self.fingerprint = artifacts_fingerprint(cfg.artifacts_dir)
        self.trials = {}  # model name -> [trial rows] (see :meth:`tune`)

    def cache_path(self, key: str) -> str:
        return os.path.join(self.cache_dir, f"{key}.json")

    def cached(self, key: str, overrides: dict, evaluate_test: bool = True):
        """The cached result of ``key`` if it matches today's config and artifacts, else None."""
        path = self.cache_path(key)
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            cached = json.load(fh)
        signature = run_signature(expand(self.cfg, overrides))
        if cached_signature(cached) != signature:
            self.log(f"[reproduce] cached {key} was run with another config: running again")
            return None
        if cached.get("artifacts", {}) != self.fingerprint:
            self.log(f"[reproduce] cached {key} was trained on other artifacts "
                     f"({self.cfg.artifacts_dir} was rebuilt): running again")
            return None
        if evaluate_test and "test" not in cached:
            return None
        return cached

    def run(self, key: str, overrides: dict, evaluate_test: bool) -> dict:
        cached = self.cached(key, overrides, evaluate_test)
        if cached is not None:
            self.run_seconds[key] = float(cached.get("seconds", 0.0))
            return cached
        if self.cached_only:
            self.missing.append(key)
            return None
        cfg = expand(self.cfg, overrides)
        from micrec_tf.train import train  # deferred: TF loads only when a run is needed

        self.log(f"[reproduce] run {key}: {overrides}")
        start = time.time()
        result = train(cfg, run_dir=os.path.join(self.root, key), evaluate_test=evaluate_test,
                       log=self.log)
        out = {"key": key, "seed": cfg.train.seed}
        out.update({k: result[k] for k in ("valid", "test", "cold_start") if k in result})
        out["history"] = result["history"]
        for k in ("best_epoch", "epochs_run", "stopped_early"):
            out[k] = result.get(k)
        out["epochs_cap"] = cfg.train.epochs
        out["seconds"] = time.time() - start
        self.run_seconds[key] = out["seconds"]
        out["overrides"] = dict(overrides)
        out["config"] = run_signature(cfg)
        out["artifacts"] = self.fingerprint
        out["machine"] = f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.machine()})"
        out["date"] = datetime.date.today().isoformat()
        path = self.cache_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(path + ".tmp", path)
        # Free the run's graph before the next one.
        import tf_keras
        tf_keras.backend.clear_session()
        return out

    def tune(self, name: str, overrides: dict, inherited: dict | None = None,
             trials: list | None = None, option=_UNSET) -> tuple:
        """Best setting of ``name`` by ``self.select`` (default validation HIT@N[0]; seed 0):
        ``(setting, run key)``.

        The grid's trials (``trials``, default :func:`grid_for`), then the model's method
        option (``option``: a (key, value) pair or None; default :func:`option_for`) at the
        grid's choice, kept if it is better on validation.
        ``inherited``: the setting its base model chose (for models with CL), applied under every
        trial. Trial runs also measure test metrics (so the winner doubles as the seed-0 run), but
        the choice reads validation only. Every trial is listed in ``self.trials[name]``.
        """
        rows = self.trials[name] = []

        def trial(setting):
            ov = {**overrides, **setting, "train.seed": 0}
            tag = ("_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(setting.items()))
                   or "default")
            key = f"tune/{slug(name)}/{slug(tag)}"
            res = self.run(key, ov, evaluate_test=True)
            if res is None:  # cached_only and not run yet
                rows.append({"setting": setting, "key": key, "valid": None, "missing": True})
                return key, None
            score = float(self.select(res))
            rows.append({"setting": setting, "key": key, "valid": score,
                         "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run"),
                         "epochs_cap": res.get("epochs_cap"),
                         "stopped_early": res.get("stopped_early")})
            return key, score

        best, best_key, best_score, complete = None, None, -1.0, True
        for t in (grid_for(overrides, self.grid) if trials is None else trials):
            setting = {**(inherited or {}), **t}
            key, score = trial(setting)
            if score is None:
                complete = False
            elif score > best_score:
                best, best_key, best_score = setting, key, score
        if option is _UNSET:
            option = option_for(overrides, self.grid)
        if complete and option is not None and best.get(option[0], _UNSET) != option[1]:
            setting = {**best, option[0]: option[1]}
            key, score = trial(setting)
            rows[-1]["option"] = True
            if score is None:
                complete = False
            elif score > best_score:
                best, best_key, best_score = setting, key, score
        if not complete:
            return None, None  # the choice is not made until every trial has run
        return best, best_key


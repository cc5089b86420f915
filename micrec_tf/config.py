"""One configuration object for every stage: dataclasses loaded from YAML and validated on load.

Unknown keys and bad values raise :class:`ConfigError` naming the offending key and value::

    cfg = load_config("configs/ml-1m.yaml", overrides={"train.epochs": 3})
    cfg.train.batch_size          # 4096
    cfg.artifacts_dir             # "artifacts/ml-1m"

No module-level mutable state: every function takes the config it needs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

DATASETS = ("synthetic", "canonical", "movielens_1m", "movielens_100k", "mind", "amazon")
SPLITS = ("global_time", "leave_last_out", "item_cold_start")
ITEM_VOCABULARIES = ("clicked", "catalogue")
# eval.search (issue 31): rank exactly, or through the export's ANN index.
EVAL_SEARCHES = ("exact", "index")
# eval.exact_engine (issue 31): the exact top-K in numpy (micrec_tf/search.py) or TensorFlow.
EVAL_EXACT_ENGINES = ("numpy", "tensorflow")
SEMANTIC_SOURCES = ("title", "taxonomy", "vectors")
MODELS = ("ican", "youtubednn", "fm", "deepfm", "autoint", "tfrs_two_tower")
CL_TASKS = ("feature", "semantic", "session")
FEATURE_DROPOUTS = ("element", "field", "categorical", "correlated", "id_field")
# CL similarity g(a, b): the paper's dot product of projected vectors, or their cosine.
CL_SIMILARITIES = ("dot", "cosine")
# Which items the CL losses are computed on: the batch's target items (clicked, so popular
# items dominate), items drawn uniformly from the catalogue, or both.
CL_ANCHORS = ("batch", "uniform", "both")
# How session CL draws a positive from an item's co-occurrence list: in proportion to the count
# (paper eq. 5) or uniformly.
SESSION_POSITIVES = ("count", "uniform")
# How session CL tests whether a pooled negative ever co-occurred with its anchor (issue 31; the
# same answers, so the same draws and losses either way): ``bitmap`` (one bit per item pair,
# V * ceil(V / 32) * 4 bytes), ``sorted`` (binary search over the sorted pair keys, the code of
# before), ``auto`` (bitmap when it fits in 64 MiB, i.e. V <= ~23,000 items, else sorted).
SESSION_MEMBERSHIPS = ("auto", "bitmap", "sorted")
# How semantic CL uses an item's title neighbours P_i^t (eq. 4): one drawn uniformly per anchor
# and step, or all of them (the InfoNCE averaged over the item's neighbours).
SEMANTIC_POSITIVES = ("sample", "all")
# train.mixed_precision: "auto" (float16 on GPUs of compute capability >= 7.0, else float32),
# "on" / "off" (float16 / float32 forced), "bfloat16" (Keras mixed_bfloat16: bfloat16 compute,
# float32 variables; for CPUs with avx512_bf16 / AMX, micrec_tf/train.py training_policy).
MIXED_PRECISION = ("auto", "on", "off", "bfloat16")
# train.optimizer (micrec_tf/optimizers.py, issue 31): tf_keras's Adam, the same Adam applied
# by one fused ResourceApplyAdam kernel per variable, or row-sparse ("lazy") Adam.
OPTIMIZERS = ("adam", "fused_adam", "lazy_adam")
INDEX_KINDS = ("scann", "brute_force")
# How the user towers embed the history clicks and how the transformer computes attention
# (speed only, the same function either way): see micrec_tf/towers.py and micrec_tf/layers.py,
# which take these tuples from here.
HISTORY_EMBEDDINGS = ("auto", "table", "slots", "unique")
ATTENTION_IMPLS = ("matmul", "einsum")
SYNTHETIC_DATA_DIR = "data/generated/synthetic"
# Named presets (paper 5.2): each sets the dotted config keys it names. A preset and an explicit
# key of the same layer (one YAML file, or one set of overrides) that disagree are an error; a
# later layer (``--set`` over the YAML) replaces what an earlier one set.
PRESETS = {
    "micrec": {"model.name": "ican", "model.cl": list(CL_TASKS)},
    "ican": {"model.name": "ican", "model.cl": []},
    "rfm_star": {"model.name": "ican", "model.cl": ["feature"], "loss.feature_dropout": "element"},
    "cfm": {"model.name": "ican", "model.cl": ["feature"], "loss.feature_dropout": "correlated"},
}
PRESET_KEY = "model.preset"


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names key and value."""


@dataclass
class SyntheticConfig:
    """Sizes of the embedded synthetic dataset (deterministic by ``seed``)."""

    # Users, items and clicks generated (micrec_tf/data/synthetic.py); all > 0.
    num_users: int = 2000
    num_items: int = 1000
    num_events: int = 60000
    # Topics: an item's first tag is its topic; users prefer a few topics.
    num_topics: int = 20
    # The same sizes and seed always give the same bytes.
    seed: int = 7
    # Probability in [0, 1] that an item's title, tags (so its category), provider and format come
    # from its click topic; otherwise from a uniformly drawn topic (clicks unchanged). 1.0 = the
    # generator before this key, byte for byte; 0 = content carries no click signal (control).
    content_topic_p: float = 1.0
    # Items that arrive over time (issue 29): ``none`` (default) = every item exists from the
    # start, the generator before these keys byte for byte (the three keys below are then not
    # read); ``news`` = each item gets a publication time (written to ``item_published.tsv``), is
    # never clicked before it and its click weight decays with age: popularity x
    # 2^(-age / interest_half_life_s) within the click's topic.
    arrival: str = "none"
    # news: share in [0, 1] of the items published at the start of the click span (T0); the
    # rest are spread uniformly over [T0, T0 + publish_span_s). The earliest item of every topic
    # is at T0 whatever the share (so every topic can be clicked from the start).
    initial_item_share: float = 0.2
    # news: seconds over which the other items are published; in (0, 10368000] (120 days, the
    # click span), at most 900 half-lives.
    publish_span_s: int = 10368000
    # news: seconds after which an item's click weight halves; > 0.
    interest_half_life_s: int = 172800


@dataclass
class DataConfig:
    """Where the raw data is and which adapter reads it."""

    # Adapter of the raw files, one of DATASETS (``canonical``: the TSV format of
    # docs/ARCHITECTURE.md; ``synthetic``: generated into data_dir first).
    dataset: str = "synthetic"
    # Raw data folder, read in place; required for a real dataset. For ``synthetic`` the
    # generator writes here first (default ``SYNTHETIC_DATA_DIR``).
    data_dir: str = ""
    # Generator sizes, read only when dataset is ``synthetic``.
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        if self.dataset == "synthetic" and not self.data_dir:
            self.data_dir = SYNTHETIC_DATA_DIR


@dataclass
class PreprocessConfig:
    """The Beam preprocessing job (pipelines/preprocess.py)."""

    # ``global_time``: train / valid / test by exact timestamp quantiles (ties at a boundary go to
    # the later split); ``leave_last_out``: per user, last click = test, second-last = valid;
    # ``item_cold_start`` (issue 28): items with sha256(raw id) % 10 in {0, 1} are cold (valid,
    # test), all their clicks evaluation clicks; warm clicks split as ``global_time``.
    split: str = "global_time"
    # [train, valid, test] shares of the clicks for ``global_time``: 3 numbers >= 0 summing to 1.
    split_fractions: list = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # Clicks read (issue 29): [since, until] in Unix seconds keeps the clicks with since <= ts <
    # until and drops the others before anything else (counted in stats.json
    # ``clicks_outside_time_range``, not dead letters): a daily update over one growing click
    # log (``python -m micrec_tf.update --since ... --until ...``). null (default): every click.
    time_range: list | None = None
    # Items of vocab/item_id.txt (issue 28): ``clicked`` (default, the vocabulary as before) = items
    # with a training click; ``catalogue`` = every item of the item file, unclicked ones last by id.
    item_vocabulary: str = "clicked"
    # Append-only vocabularies (issue 29): an earlier run's artifacts folder. Every value of each
    # of its vocab/<field>.txt keeps its line (= index), new values are appended after them by
    # training count, then value (pipelines/lineage.py; lineage.json records the folder and its
    # version). "" (default) = vocabularies rebuilt from scratch, the artifacts of before.
    previous_artifacts: str = ""
    # H: each example's history holds the user's H most recent earlier clicks (``hist_items``).
    history_length: int = 20
    # Tags kept per item (its first distinct ones), the width of ``item_tags``.
    max_tags: int = 8
    # Session window in seconds: two clicks at most this far apart co-occur (see below).
    session_window_s: int = 3600
    # Session co-occurrence (paper 3.5): every pair of distinct items a user clicked within
    # ``session_window_s`` (inclusive) counts once. 0 = no cap (the paper's definition); N > 0
    # pairs each click with at most its N nearest earlier clicks (faster, biased to bursts).
    max_pairs_per_click: int = 0
    # 0 = keep each item's full co-occurrence list (the paper's); M > 0 keeps the top M by count.
    cooccurrence_top_m: int = 0
    # Issue 29: also write cooccurrence/session_tails.jsonl + session_state.json (each user's
    # training clicks within session_window_s of the user's last one), the state an incremental
    # update (pipelines.cooccurrence.update_cooccurrence) needs; needs cooccurrence_top_m 0.
    # With previous_artifacts too, the table = the previous one + this run's clicks (sessions
    # across the boundary once). false (default) = no such files, the artifacts of before.
    session_tails: bool = False
    # Issue 29: also write history_tails/ (each user's last history_length clicks over
    # everything seen so far: the previous artifacts' tails merged with this run's clicks, cold
    # items never), and with previous_artifacts holding tails, every example of this run gets
    # as history the user's last history_length earlier clicks over (previous tail + this run's)
    # (pipelines/history_tails.py). false (default) = no such files, histories from this run's
    # clicks only: the artifacts of before.
    history_tails: bool = False
    # "Same category" of session CL's emphasis: ``tags`` = the two items share at least one tag;
    # ``provider`` or an item extra field name (e.g. ``year``) = equal non-empty values.
    session_category: str = "tags"
    # TFRecord shards per split (users assigned by a hash of their id).
    num_shards: int = 4
    # Keep one copy of identical (user, item, timestamp) clicks; copies are counted in stats.
    deduplicate_clicks: bool = False
    # Sparsity sweep rebuilt from thinned clicks (issue 28): only the training clicks of users with
    # int(sha256(raw user id).hexdigest(), 16) % 10**6 < round(f * 10**6) reach the training
    # artifacts (vocabularies, item counts, co-occurrence, train examples); the kept users nest
    # across fractions; valid / test examples unchanged (pipelines/thinning.py). In (0, 1], read to
    # 6 decimals; 1.0 (default) = every user, the artifacts of before byte for byte.
    train_user_fraction: float = 1.0
    # Extra Beam pipeline options, e.g. ["--runner=DataflowRunner", "--project=..."].
    beam_args: list = field(default_factory=list)


@dataclass
class SemanticConfig:
    """Sources of item semantics for semantic-level CL (paper 3.4) and the neighbour job."""

    # ``title`` (all-MiniLM-L6-v2 title embeddings, cosine), ``taxonomy`` (Jaccard of tag sets) or
    # ``vectors`` (user-supplied vectors at vectors_path, cosine).
    source: str = "title"
    # ``.npz`` (item_ids, vectors) or text ``item_id<TAB>v1 v2 ...`` file; required for ``vectors``.
    vectors_path: str = ""
    # Title neighbours kept per item (P_i^t of semantic CL), best first.
    top_k: int = 10
    # Tokens per title for the encoder, [CLS] and [SEP] included (longer titles are truncated).
    max_length: int = 64
    # Titles per encoder batch in the Beam job (speed and memory).
    batch_size: int = 64
    # Exact blocked matrix products up to this many items, ScaNN above it.
    exact_max_items: int = 100000
    # Regex removed from titles before encoding (e.g. MovieLens's trailing " (1995)").
    title_strip_pattern: str = ""


@dataclass
class ModelConfig:
    """Towers and contrastive plug-ins (paper 3.3-3.6, 5.3)."""

    # Base two-tower model, one of MODELS (``tfrs_two_tower``: the TFRS peer, without CL).
    name: str = "ican"
    # One of PRESETS (sets the keys it names, see PRESETS above), or "" for none.
    preset: str = ""
    # Width of every feature-field embedding (item id, tags, profile fields, ...).
    embedding_dim: int = 64
    # D: width of the user and item vectors that are matched (the served user_embedding).
    output_dim: int = 64
    # Hidden and output widths of the item / user tower MLPs; for ican and youtubednn the last
    # entry must equal output_dim.
    item_mlp_units: list = field(default_factory=lambda: [128, 64, 64])
    user_mlp_units: list = field(default_factory=lambda: [128, 64, 64])
    # Attention heads and layers of the transformer (ican's history encoder, autoint's towers).
    num_heads: int = 2
    num_transformer_layers: int = 1
    # ICAN: width of the transformer over the recent clicks (raw item embeddings are projected
    # to it); 0 = the raw width (fields x embedding_dim).
    transformer_dim: int = 64
    # Dropout rate of the towers, in [0, 1).
    dropout: float = 0.0
    # The CL terms trained with the main loss, a subset of CL_TASKS ([] = the base model alone).
    cl: list = field(default_factory=lambda: list(CL_TASKS))
    # Speed only (the same function either way; see micrec_tf/towers.py and layers.py):
    # history embeddings through a per-call catalogue table (auto: when the catalogue has fewer
    # items than batch x history slots) or per slot; attention as batched matmuls or through
    # tf_keras's einsum MultiHeadAttention (the pre-0.2 code paths: slots + einsum); ``unique``
    # (issue 31) embeds only the batch's distinct history items, for large catalogues: ``auto``
    # (default) takes it for training at V >= batch x history (inference stays per slot, so
    # exported models are unchanged); ``slots`` = the ``auto`` of before that change.
    history_embeddings: str = "auto"
    attention: str = "matmul"
    # Content in the item tower (issue 28): the item's frozen text vector (title_embeddings/ of
    # pipelines.title_neighbours, sources title or vectors) projected to embedding_dim as one
    # more item field (micrec_tf/layers_text.py). false = the tower of before, bit for bit.
    item_text: bool = False
    # An item with fewer training clicks (vocab/item_id_counts.txt) never uses its ID row: its ID
    # field is zero, as if dropped (issue 28). Int >= 0; 1 (default) masks only unclicked items,
    # none with a vocabulary of clicked items (the model of before); 0 never masks.
    min_id_clicks: int = 1


@dataclass
class LossConfig:
    """Main sampled softmax and the CL losses, ``L = L_S + l1 L_fea + l2 L_sem + l3 L_sess``."""

    # Main loss negatives: items drawn uniformly from the catalogue per batch, shared by its rows
    # (0 needs in_batch_negatives).
    num_negatives: int = 1000
    # Also use the batch's other positives as negatives (with logQ correction).
    in_batch_negatives: bool = False
    # A negative equal to the row's positive item is masked out of that row's softmax.
    remove_accidental_hits: bool = True
    # l1, l2, l3: weights (>= 0) of the feature, semantic and session CL losses.
    lambda_feature: float = 1.0
    lambda_semantic: float = 0.3
    lambda_session: float = 0.1
    # tau (> 0) of the CL losses' InfoNCE: logits are g(a, b) / tau.
    temperature: float = 1.0
    # g(.,.) of the CL losses: "dot" (paper eqs. 2-5) or "cosine" (projected vectors
    # L2-normalised, so CL constrains directions and leaves the norms to the main loss).
    cl_similarity: str = "dot"
    # Feature CL's augmentation, one of FEATURE_DROPOUTS: ``element`` (mask single elements),
    # ``field`` (zero whole fields), ``categorical`` (drop tags), ``correlated`` (CFM),
    # ``id_field`` (zero the ID field alone, with probability mask_ratio; issue 28).
    feature_dropout: str = "element"
    # Share (in (0, 1)) of the elements, fields or tags feature CL masks (correlated: of fields).
    mask_ratio: float = 0.5
    # Negatives per anchor of semantic and session CL (random items outside the positives' set).
    num_cl_negatives: int = 50
    # Session CL: factor (> 0) on the count of a same-category pair when drawing the positive.
    same_category_weight: float = 2.0
    # The items that get CL, one of CL_ANCHORS (see CL_ANCHORS above).
    cl_anchors: str = "batch"
    # Session CL's positive draw, one of SESSION_POSITIVES (see SESSION_POSITIVES above).
    session_positives: str = "count"
    # Session CL draws a pool of this many x num_cl_negatives uniform items per step; each anchor
    # keeps the first num_cl_negatives that never co-occurred with it. On ml-1m the median item
    # co-occurs with 67 % of the catalogue: with x8, 96 % of items keep >= 45 of their 50 negatives
    # in expectation (x4: 71 %).
    session_negative_pool: int = 8
    # Session CL's membership test, one of SESSION_MEMBERSHIPS (see above): speed only, every
    # setting gives the same negatives ("sorted" is the code of before issue 31).
    session_membership: str = "auto"
    # Semantic CL's use of the title neighbours, one of SEMANTIC_POSITIVES (see above).
    semantic_positives: str = "sample"
    # Main loss (eq. 7): a sampled negative that is in the row's recent clicks (``hist_items``)
    # is not "an item not clicked by u" and is masked out of that row's softmax.
    mask_history_negatives: bool = True
    # Main loss, training only (DropoutNet's trick, issue 28): probability in [0, 1) that the
    # positive's and each sampled negative's ID field is zeroed. 0 = the loss of before.
    id_dropout: float = 0.0


@dataclass
class TrainConfig:
    """The training run (micrec_tf/train.py): optimisation, early stopping, checkpoints, devices."""

    # Examples per training step.
    batch_size: int = 4096
    # Adam's learning rate (> 0).
    learning_rate: float = 0.001
    # Most epochs to run; an epoch = ceil(train examples x train_fraction / batch_size) steps.
    epochs: int = 10
    # Seeds Keras/TF/numpy, the shuffling of the training stream and the validation subsample.
    seed: int = 42
    # Epochs without a better validation HIT@N (first N of eval.hit_n) before stopping; the run
    # keeps its best epoch's weights. 0 = no early stopping: the run keeps its last epoch.
    early_stopping_patience: int = 2
    # Validation clicks scored after every epoch (and in metrics.json): a fixed seeded subset.
    validation_max_examples: int = 20000
    # "auto": mixed_float16 only when every visible GPU has compute capability >= 7.0 (float32 on
    # CPU and on Pascal cards such as the P40); "on" / "off" force it either way. "bfloat16":
    # mixed_bfloat16 (opt-in, issue 31): bfloat16 matrix products, float32 variables and losses;
    # it pays on CPUs with avx512_bf16 or AMX (the log says whether this one has them; without,
    # the products are emulated and slower). A different run: its quality was not compared.
    mixed_precision: str = "auto"
    # Backup (BackupAndRestore) every this many batches, and at every epoch end.
    steps_per_checkpoint: int = 200
    # Parent folder of the run directories: runs/<name>.
    runs_dir: str = "runs"
    # Stop before training when TensorFlow sees no GPU (instead of training on the CPU).
    require_gpu: bool = False
    # Sparsity sweep: train on this fraction of users' training clicks (sampled by user, seeded).
    train_fraction: float = 1.0
    # Warm start (issue 29, micrec_tf/warm_start.py): a finished run folder (or an export version
    # made from one) whose checkpoint the model starts from, its tables grown for the ids the
    # append-only vocabularies added. "" (default) = train from scratch, as before the key.
    warm_start_from: str = ""
    # Epochs of a warm-started update (replaces train.epochs when warm_start_from is set): one
    # pass over the window by default; > 1 with early_stopping_patience > 0 = early stopping.
    warm_start_epochs: int = 1
    # Multi-worker training (issue 31, TF_CONFIG set): seconds a collective (all-reduce) may wait
    # before failing, so a lost worker stops the others; 0 (default) = no timeout, as before the
    # key. Not read without TF_CONFIG.
    collective_timeout_s: float = 0.0
    # The optimizer (micrec_tf/optimizers.py, issue 31): "adam" (default: tf_keras's Adam, as
    # before the key, bit for bit) or "fused_adam" (the same Adam, one fused ResourceApplyAdam
    # kernel per variable, sparse gradients summed densely first: equal up to float rounding,
    # faster on large embedding tables; checkpoints restore across the two) or "lazy_adam" (a
    # DIFFERENT optimizer: a sparse gradient updates only its rows' moments and values; needs its
    # own quality run).
    optimizer: str = "adam"


@dataclass
class EvalConfig:
    """Offline evaluation (micrec_tf/evaluation): HIT@N and coverage@N on validation and test."""

    # N of HIT@N (paper 5.4.1): share of clicks whose item is in the query's top-N. The first N is
    # the validation metric of early stopping.
    hit_n: list = field(default_factory=lambda: [50, 100, 200, 500])
    # N of coverage@N (paper 5.6.2): share of the catalogue in the union of all top-N lists.
    coverage_n: list = field(default_factory=lambda: [50, 500])
    # Remove the items each user clicked before the query click from its ranking (a target among
    # them is a miss); false = rank the whole catalogue.
    exclude_clicked: bool = False
    # Rank with ScaNN instead of exact brute force (evaluate_retrieval's ``use_scann``); no
    # evaluation entry point reads this key today: they all rank exactly.
    use_scann: bool = False
    # How ``python -m micrec_tf.evaluation.index_eval`` ranks (issue 31): ``exact`` (default: every
    # item scored, as train's final evaluation does, bit for bit) or ``index`` = through the
    # export's item index (its ScaNN searcher), reporting index_recall@N against exact search.
    # Train's own evaluation does not read this key: it always ranks exactly.
    search: str = "exact"
    # Engine of the exact ranking (issue 31) in train's per-epoch and final evaluation and
    # index_eval's exact search: ``numpy`` (default: micrec_tf.search.top_k_dot, as before the
    # key, bit for bit) or ``tensorflow`` (micrec_tf/evaluation/tf_top_k.py: tf.matmul +
    # tf.math.top_k, the same lists and tie rule, faster on large catalogues; near-equal scores
    # may swap where BLAS and Eigen round differently). The cold-start slices stay numpy.
    exact_engine: str = "numpy"
    # Query clicks per user-tower batch when computing user vectors (speed and memory).
    batch_size: int = 1024
    # Test clicks scored by train's final evaluation: 0 = all of them, else a fixed seeded random
    # subset of this many (train.seed), for catalogues where exact ranking of every click is slow.
    test_max_examples: int = 0
    # Seeds 0 .. seeds-1 per model in ``experiments.reproduce`` (mean +- std over them).
    seeds: int = 5


@dataclass
class ExportConfig:
    """The serving export (export/export_model.py): user-tower SavedModel, item vectors, index."""

    # Parent folder of the exports: exports/<name>/<version>/.
    exports_dir: str = "exports"
    # Item index: "scann" (ANN; the export falls back to brute force under 256 items or when the
    # catalogue has no more than top_k items) or "brute_force" (exact, every item scored).
    index: str = "scann"
    # K: items retrieved per request; ScaNN's leaves to search are tuned for top-K recall.
    top_k: int = 500
    # Retention (issue 29): after publishing, an export keeps the newest keep_versions published
    # versions of exports/<name> (and their TF Serving views) and removes the older ones; an
    # update (micrec_tf/update.py) then also removes its generation folders that no kept version
    # uses. 0 (default): keep every version, the behaviour of before. Else >= 2: the version
    # before the newest stays while servers switch to the newest.
    keep_versions: int = 0
    # model.item_text (issue 28): the export folds the text field's projection into one
    # [items x embedding_dim] table (micrec_tf/layers_text.py fold_text_projection), so the
    # served user tower no longer carries the [items x 384] text vectors (1.54 GB at 1 M items);
    # the same function up to float32 rounding. false: the tower of before, with the vectors.
    fold_text: bool = True
    # Largest catalogue that export.index: brute_force accepts (every item scored per request).
    brute_force_max_items: int = 20000
    # Most users one REST :predict request may hold (export/rest.py refuses more, before any array
    # conversion): the tower runs on a request's whole batch at once, ~62 KB and 0.4 ms per user
    # (a 45k-user request took 2.8 GB, 18 s), so 1024, the Python API's own batch, bounds one
    # call to ~64 MB. The Python API batches instead of capping.
    max_request_instances: int = 1024
    # The HTTP service (python -m export.server, docs/SERVING.md "The retrieval service"); none of
    # these keys changes an export. Model name of the URLs /v1/models/<name>:predict etc.: TF
    # Serving's name in docs/SERVING.md, so a TF Serving client works unchanged.
    serve_model_name: str = "user_tower"
    # Address and port the service listens on (--host / --port override them); 8501 is left to a
    # real TF Serving beside it.
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    # Largest request body in bytes (413 above it, refused before its JSON is parsed): 8 MiB,
    # export/rest.py's DEFAULT_MAX_BYTES.
    serve_max_request_bytes: int = 8 * 1024 * 1024
    # Largest k of one :retrieve request (400 above it); the default k is top_k.
    serve_max_k: int = 2000
    # Seconds SIGTERM waits for in-flight requests before closing their connections.
    serve_shutdown_timeout_s: int = 30
    # Seconds between two looks for a newer published version to load, warm and swap in
    # (export/versions.py).
    serve_poll_s: float = 10.0
    # Micro-batching (export/batcher.py): concurrent requests share one user-tower call and one
    # index search of at most serve_max_batch_size users (0: no batching, each request runs
    # alone), the first waiting at most serve_max_wait_ms for company; more than serve_max_queue
    # waiting requests per stage get 503 with Retry-After.
    serve_max_batch_size: int = 256
    serve_max_wait_ms: float = 2.0
    serve_max_queue: int = 512
    # Queue-delay admission (export/batcher.py, "Queue delay"): a request arriving while the
    # oldest one waiting in its stage has waited more than serve_max_wait_ms + this many ms gets
    # 503 with Retry-After at once (counted as micrec_rejected_delay_total). 500 ms: a stage's
    # queue wait stays near 2 x 0.5 s at 2 x S, where 512-deep queues alone allowed 512 / S
    # (1.8-2.3 s at S ~ 223-284 req/s, 100 k export), and it is above the whole closed-loop p99
    # at concurrency 32 (0.31-0.35 s), so a load the server keeps up with is not refused. It does
    # not bound the event loop's wait (docs/SERVING.md "queue-delay admission", measured).
    # 0: off, the old behaviour (only serve_max_queue bounds the queue). Needs batching.
    serve_max_queue_delay_ms: float = 500.0
    # Admission at arrival (export/admission.py): a :predict / :retrieve arriving while this many
    # are admitted and not yet answered gets 503 with Retry-After at once, before its body is
    # read (counted as micrec_rejected_in_flight_total; /healthz, /readyz, /metrics and status
    # are never refused). It bounds the whole backlog in the app, the event loop's included,
    # which the per-stage rules cannot see: an admitted request waits about this / S at a drain
    # of S req/s. 256 (= the default batch, 8 x the closed-loop concurrency 32, never refused
    # there): measured at 654.6 req/s on the 100 k export, the 200s' p99 1.57 s (bound 2.04 s)
    # against 3.83 s at 512, and 7.97 s with the rule off (docs/BENCHMARKS.md "Serving").
    # 0: off, the old behaviour (docs/SERVING.md "admission at arrival").
    serve_max_in_flight: int = 256
    # Per-request deadline in seconds from its arrival: a request still waiting in a
    # micro-batcher queue then is dropped before it runs and answered 504 (counted as
    # micrec_expired_total). 0 (default): no deadline, the old behaviour. Needs batching.
    serve_request_timeout_s: float = 0.0
    # Drop a request from its micro-batcher queue when its client disconnects before its batch
    # runs (answered 499, counted as micrec_cancelled_total). false (default): the old
    # behaviour, it runs anyway. Needs batching.
    serve_drop_disconnected: bool = False


@dataclass
class Config:
    """The whole configuration. ``name`` names artifacts/<name>, runs/<name>, exports/<name>."""

    name: str = "synthetic"
    artifacts_root: str = "artifacts"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def artifacts_dir(self) -> str:
        return os.path.join(self.artifacts_root, self.name)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.train.runs_dir, self.name)

    @property
    def export_dir(self) -> str:
        return os.path.join(self.export.exports_dir, self.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A validated copy with dotted-key overrides, e.g. ``{"loss.lambda_session": 0.5}``.

        ``model.preset`` among the overrides sets the keys it names (over this config's values);
        an override of a key the current preset names, to another value, drops the preset name
        (the model is no longer that preset).
        """
        raw = self.to_dict()
        overrides = dict(overrides)
        preset = overrides.pop(PRESET_KEY, None)
        if preset:
            keys = _preset_keys(preset)
            _check_preset_conflicts(preset, keys, overrides, "the overrides")
            overrides = {**keys, **overrides}
        elif self.model.preset:
            named = _preset_keys(self.model.preset)
            if any(k in named and v != named[k] for k, v in overrides.items()):
                preset = ""
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        if preset is not None:
            raw["model"]["preset"] = preset
        return from_dict(raw)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def _build(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section {path or '<root>'!r} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f" in section {path!r}" if path else ""
        raise ConfigError(
            f"unknown config key(s) {unknown}{where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        value = raw[name]
        key = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else _TYPES.get(f.type)):
            kwargs[name] = _build(_TYPES.get(f.type, f.type), value, key)
        else:
            kwargs[name] = _coerce(f, value, key)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, key: str):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check below (all compare False)
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"{key} must hold finite numbers, got {value!r}")
        return list(value)
    return value


_TYPES = {
    "SyntheticConfig": SyntheticConfig, "DataConfig": DataConfig,
    "PreprocessConfig": PreprocessConfig, "SemanticConfig": SemanticConfig,
    "ModelConfig": ModelConfig, "LossConfig": LossConfig, "TrainConfig": TrainConfig,
    "EvalConfig": EvalConfig, "ExportConfig": ExportConfig,
}


def _check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# ``name`` is one folder name under artifacts/, runs/ and exports/ (jobs replace and delete
# things there): letters, digits, "_", "-", "." and "+", not starting with a dot (the folders'
# lock files are ``.<name>.lock``), without ".tmp-" / ".old-" (the names of temporary
# siblings, swept by micrec_tf.publish), at most 128 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


def _check_name(name) -> None:
    if (not isinstance(name, str) or not NAME_PATTERN.fullmatch(name)
            or ".tmp-" in name or ".old-" in name):
        raise ConfigError(
            "name must be one folder name (artifacts/<name>, runs/<name>, exports/<name>): "
            "letters, digits, '_', '-', '.', '+', not starting with '.', without '.tmp-' or "
            f"'.old-', at most 128 characters. Received: {name!r}")


def validate(cfg: Config) -> Config:
    """Checks values that types alone cannot; returns ``cfg`` or raises :class:`ConfigError`."""
    _check_name(cfg.name)
    _check_choice("data.dataset", cfg.data.dataset, DATASETS)
    if not cfg.data.data_dir:
        raise ConfigError(f"data.data_dir is missing: data.dataset is {cfg.data.dataset!r}; set "
                          f"data.data_dir to the folder that holds its raw files")
    _check_choice("preprocess.split", cfg.preprocess.split, SPLITS)
    _check_choice("preprocess.item_vocabulary", cfg.preprocess.item_vocabulary, ITEM_VOCABULARIES)
    _check_choice("semantic.source", cfg.semantic.source, SEMANTIC_SOURCES)
    _check_choice("model.name", cfg.model.name, MODELS)
    _check_choice("loss.feature_dropout", cfg.loss.feature_dropout, FEATURE_DROPOUTS)
    _check_choice("loss.cl_similarity", cfg.loss.cl_similarity, CL_SIMILARITIES)
    _check_choice("loss.cl_anchors", cfg.loss.cl_anchors, CL_ANCHORS)
    _check_choice("loss.session_positives", cfg.loss.session_positives, SESSION_POSITIVES)
    _check_choice("loss.session_membership", cfg.loss.session_membership, SESSION_MEMBERSHIPS)
    _check_choice("loss.semantic_positives", cfg.loss.semantic_positives, SEMANTIC_POSITIVES)
    if not isinstance(cfg.loss.session_negative_pool, int) or cfg.loss.session_negative_pool < 1:
        raise ConfigError(f"loss.session_negative_pool must be an int >= 1. Received: "
                          f"{cfg.loss.session_negative_pool!r}")
    _check_choice("train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISION)
    _check_choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    if not cfg.train.collective_timeout_s >= 0:
        raise ConfigError(f"train.collective_timeout_s must be >= 0 (0 = no timeout). Received: "
                          f"{cfg.train.collective_timeout_s!r}")
    _check_choice("export.index", cfg.export.index, INDEX_KINDS)
    _check_choice("model.history_embeddings", cfg.model.history_embeddings, HISTORY_EMBEDDINGS)
    if cfg.model.item_text and cfg.loss.feature_dropout == "correlated":
        raise ConfigError("model.item_text is not supported with loss.feature_dropout="
                          "'correlated' yet (its field correlation has no text field)")
    _check_choice("model.attention", cfg.model.attention, ATTENTION_IMPLS)
    if cfg.model.preset:
        _check_choice("model.preset", cfg.model.preset, PRESETS)
    for task in cfg.model.cl:
        _check_choice("model.cl[]", task, CL_TASKS)
    if cfg.model.name == "tfrs_two_tower" and cfg.model.cl:
        raise ConfigError(f"model.name 'tfrs_two_tower' (the TFRS peer) takes no CL terms; "
                          f"set model.cl: []. Received: {cfg.model.cl!r}")
    if len(set(cfg.model.cl)) != len(cfg.model.cl):
        raise ConfigError(f"model.cl lists a task twice: {cfg.model.cl!r}")
    fr = cfg.preprocess.split_fractions
    if (len(fr) != 3 or any(not isinstance(x, (int, float)) or x < 0 for x in fr)
            or abs(sum(fr) - 1.0) > 1e-6):
        raise ConfigError(
            f"preprocess.split_fractions must be 3 non-negative numbers summing to 1, got {fr!r}")
    tr = cfg.preprocess.time_range
    if tr is not None and (not isinstance(tr, (list, tuple)) or len(tr) != 2
                           or any(isinstance(x, bool) or not isinstance(x, int) for x in tr)
                           or tr[0] >= tr[1]):
        raise ConfigError("preprocess.time_range must be null or [since, until], two ints (Unix "
                          f"seconds) with since < until, got {tr!r}")
    for key in ("history_length", "max_tags", "session_window_s", "num_shards"):
        _check_positive(f"preprocess.{key}", getattr(cfg.preprocess, key))
    tuf = cfg.preprocess.train_user_fraction
    if (isinstance(tuf, bool) or not isinstance(tuf, (int, float))
            or not 1e-6 <= tuf <= 1.0):
        raise ConfigError(f"preprocess.train_user_fraction must be a number in [1e-6, 1]. "
                          f"Received: {tuf!r}")
    for key in ("max_pairs_per_click", "cooccurrence_top_m"):  # 0 = no cap
        _check_positive(f"preprocess.{key}", getattr(cfg.preprocess, key), allow_zero=True)
    if cfg.preprocess.session_tails and cfg.preprocess.cooccurrence_top_m:
        raise ConfigError(f"preprocess.session_tails needs preprocess.cooccurrence_top_m 0 (an "
                          f"update adds to full rows). Received: "
                          f"{cfg.preprocess.cooccurrence_top_m!r}")
    category = cfg.preprocess.session_category
    if not isinstance(category, str) or not category.strip():
        raise ConfigError(f"preprocess.session_category must be 'tags', 'provider' or an item "
                          f"extra field name. Received: {category!r}")
    for key in ("top_k", "max_length", "batch_size", "exact_max_items"):
        _check_positive(f"semantic.{key}", getattr(cfg.semantic, key))
    try:
        re.compile(cfg.semantic.title_strip_pattern)
    except re.error as err:
        raise ConfigError(f"semantic.title_strip_pattern is not a valid regex "
                          f"({cfg.semantic.title_strip_pattern!r}): {err}") from None
    if cfg.semantic.source == "vectors" and not cfg.semantic.vectors_path:
        raise ConfigError("semantic.vectors_path is required when semantic.source is 'vectors'")
    for key in ("embedding_dim", "output_dim", "num_heads", "num_transformer_layers"):
        _check_positive(f"model.{key}", getattr(cfg.model, key))
    for key in ("item_mlp_units", "user_mlp_units"):
        units = getattr(cfg.model, key)
        if not units or any(not isinstance(u, int) or u <= 0 for u in units):
            raise ConfigError(f"model.{key} must be a non-empty list of positive ints, "
                              f"got {units!r}")
    _check_positive("model.transformer_dim", cfg.model.transformer_dim, allow_zero=True)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout!r}")
    _check_positive("loss.num_negatives", cfg.loss.num_negatives, allow_zero=True)
    if cfg.loss.num_negatives == 0 and not cfg.loss.in_batch_negatives:
        raise ConfigError("loss.num_negatives is 0 and loss.in_batch_negatives is false: "
                          "the main loss would have no negatives")
    for task in CL_TASKS:  # loss.lambda_<task>
        _check_positive(f"loss.lambda_{task}", getattr(cfg.loss, f"lambda_{task}"),
                        allow_zero=True)
    _check_positive("loss.temperature", cfg.loss.temperature)
    if (isinstance(cfg.model.min_id_clicks, bool) or not isinstance(cfg.model.min_id_clicks, int)
            or cfg.model.min_id_clicks < 0):
        raise ConfigError(f"model.min_id_clicks must be an int >= 0. Received: "
                          f"{cfg.model.min_id_clicks!r}")
    if (isinstance(cfg.loss.id_dropout, bool) or not isinstance(cfg.loss.id_dropout, (int, float))
            or not 0.0 <= cfg.loss.id_dropout < 1.0):
        raise ConfigError(f"loss.id_dropout must be in [0, 1). Received: {cfg.loss.id_dropout!r}")
    if not 0.0 < cfg.loss.mask_ratio < 1.0:
        raise ConfigError(f"loss.mask_ratio must be in (0, 1), got {cfg.loss.mask_ratio!r}")
    _check_positive("loss.num_cl_negatives", cfg.loss.num_cl_negatives)
    _check_positive("loss.same_category_weight", cfg.loss.same_category_weight)
    for key in ("batch_size", "learning_rate", "epochs", "validation_max_examples",
                "steps_per_checkpoint", "warm_start_epochs"):
        _check_positive(f"train.{key}", getattr(cfg.train, key))
    _check_positive("train.early_stopping_patience", cfg.train.early_stopping_patience, True)
    _check_positive("eval.test_max_examples", cfg.eval.test_max_examples, True)
    _check_choice("eval.search", cfg.eval.search, EVAL_SEARCHES)
    _check_choice("eval.exact_engine", cfg.eval.exact_engine, EVAL_EXACT_ENGINES)
    if not 0.0 < cfg.train.train_fraction <= 1.0:
        raise ConfigError(f"train.train_fraction must be in (0, 1], "
                          f"got {cfg.train.train_fraction!r}")
    for key in ("hit_n", "coverage_n"):
        ns = getattr(cfg.eval, key)
        if not ns or any(not isinstance(n, int) or n <= 0 for n in ns):
            raise ConfigError(f"eval.{key} must be a non-empty list of positive ints, got {ns!r}")
    _check_positive("eval.seeds", cfg.eval.seeds)
    _check_positive("export.top_k", cfg.export.top_k)
    if (not isinstance(cfg.export.keep_versions, int) or isinstance(cfg.export.keep_versions, bool)
            or cfg.export.keep_versions == 1 or cfg.export.keep_versions < 0):
        raise ConfigError("export.keep_versions must be 0 (keep every version) or an int >= 2 "
                          "(the version before the newest stays while servers switch), got "
                          f"{cfg.export.keep_versions!r}")
    _check_positive("export.max_request_instances", cfg.export.max_request_instances)
    for key in ("serve_port", "serve_max_request_bytes", "serve_max_k", "serve_shutdown_timeout_s"):
        _check_positive(f"export.{key}", getattr(cfg.export, key), allow_zero=key == "serve_port")
    _check_positive("export.serve_poll_s", cfg.export.serve_poll_s)
    _check_positive("export.serve_max_batch_size", cfg.export.serve_max_batch_size, allow_zero=True)
    _check_positive("export.serve_max_wait_ms", cfg.export.serve_max_wait_ms, allow_zero=True)
    _check_positive("export.serve_max_queue", cfg.export.serve_max_queue)
    _check_positive("export.serve_max_in_flight", cfg.export.serve_max_in_flight, allow_zero=True)
    _check_positive("export.serve_max_queue_delay_ms", cfg.export.serve_max_queue_delay_ms,
                    allow_zero=True)
    _check_positive("export.serve_request_timeout_s", cfg.export.serve_request_timeout_s,
                    allow_zero=True)
    if cfg.export.serve_port > 65535:
        raise ConfigError(f"export.serve_port must be <= 65535, got {cfg.export.serve_port!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.export.serve_model_name):
        raise ConfigError("export.serve_model_name must be letters, digits, '_', '.', '-', got "
                          f"{cfg.export.serve_model_name!r}")
    for key in ("num_users", "num_items", "num_events", "num_topics"):
        _check_positive(f"data.synthetic.{key}", getattr(cfg.data.synthetic, key))
    p = cfg.data.synthetic.content_topic_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"data.synthetic.content_topic_p must be a number in [0, 1], got {p!r}")
    arrival_error = synthetic_arrival_error(cfg.data.synthetic)
    if arrival_error:
        raise ConfigError(arrival_error)
    return cfg


SYNTHETIC_ARRIVALS = ("none", "news")
SYNTHETIC_WINDOW_S = 120 * 86400  # the generator's click span (micrec_tf/data/synthetic.py)
MAX_PUBLISH_HALF_LIVES = 900  # 2^900 still fits a float64 with room for the sums


def synthetic_arrival_error(syn: "SyntheticConfig") -> str:
    """The one-line error of the first invalid ``data.synthetic`` arrival key, or "".

    The three news keys are checked only when ``arrival`` is ``news`` (at ``none`` they are not
    read)."""
    arrival = syn.arrival
    if arrival not in SYNTHETIC_ARRIVALS:
        return (f"data.synthetic.arrival must be one of {list(SYNTHETIC_ARRIVALS)}, "
                f"got {arrival!r}")
    if arrival == "none":
        return ""
    share = syn.initial_item_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        return f"data.synthetic.initial_item_share must be a number in [0, 1], got {share!r}"
    span = syn.publish_span_s
    if (isinstance(span, bool) or not isinstance(span, int)
            or not 0 < span <= SYNTHETIC_WINDOW_S):
        return (f"data.synthetic.publish_span_s must be an int in (0, {SYNTHETIC_WINDOW_S}], "
                f"got {span!r}")
    half = syn.interest_half_life_s
    if isinstance(half, bool) or not isinstance(half, int) or half <= 0:
        return f"data.synthetic.interest_half_life_s must be an int > 0, got {half!r}"
    if span > MAX_PUBLISH_HALF_LIVES * half:
        return (f"data.synthetic.interest_half_life_s must be at least publish_span_s / "
                f"{MAX_PUBLISH_HALF_LIVES} = {span / MAX_PUBLISH_HALF_LIVES:g}, got {half!r}")
    return ""


def _preset_keys(preset: Any) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"model.preset must be one of {list(PRESETS)}, got {preset!r}")
    return copy.deepcopy(PRESETS[preset])


def _check_preset_conflicts(preset: str, keys: dict, explicit: Mapping[str, Any],
                            where: str) -> None:
    for key, value in keys.items():
        if key in explicit and explicit[key] != value:
            raise ConfigError(
                f"model.preset={preset!r} sets {key}={value!r}, but {where} also set "
                f"{key}={explicit[key]!r}: remove one of the two")


def _get_dotted(raw: Mapping, key: str):
    node = raw
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Builds and validates a :class:`Config`; ``model.preset`` sets the keys it names.

    A key the preset names that ``raw`` also sets to another value is a :class:`ConfigError`.
    """
    raw = copy.deepcopy(dict(raw or {}))
    preset = (raw.get("model") or {}).get("preset")
    if preset:
        keys = _preset_keys(preset)
        explicit = {k: v for k in keys if (v := _get_dotted(raw, k)) is not _MISSING}
        _check_preset_conflicts(preset, keys, explicit, "the config")
        for key, value in keys.items():
            section, name = key.split(".")
            if raw.get(section) is None:
                raw[section] = {}
            if isinstance(raw[section], Mapping):  # else _build names the bad section
                raw[section][name] = value
    return validate(_build(Config, raw, ""))


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads a YAML config file; ``overrides`` are dotted keys applied after loading."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path!r}")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory: give the YAML file inside it")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file {path!r} is not UTF-8: byte {data[err.start]:#04x} at "
                          f"line {line}; save it as UTF-8") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(err)}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path!r} must be a mapping of sections (name:, data:, "
                          f"train:, ...) at its top level, got a {type(raw).__name__}")
    cfg = from_dict(raw)
    return cfg.replace(overrides) if overrides else cfg


def _yaml_problem(err: Exception) -> str:
    """What a ``yaml.YAMLError`` says is wrong and where (1-based line and column), one line."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{what}{where}"


def parse_overrides(items: list[str] | None) -> dict:
    """Parses CLI ``--set key=value`` items; values are read as YAML (``3``, ``true``,
    ``[1,2]``)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item} is not valid YAML: {_yaml_problem(err)} (a list is "
                              f"written [a, b]; quote a string that holds YAML syntax)") from err
    return out

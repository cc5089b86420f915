"""The serving user tower: a SavedModel that takes raw string features and returns the user vector.

Signature ``serving_default`` (method ``tensorflow/serving/predict``)::

    inputs
      <profile field>   DT_STRING [-1]       one per user profile field, e.g. "gender", "age"
                                             (the column names of users.tsv / the feature spec's
                                             ``user_fields``), raw values such as "F", "25"
      history           DT_STRING [-1, -1]   the user's recently clicked item ids, OLDEST FIRST,
                                             padded with "" at the end to a common length
    outputs
      user_embedding    DT_FLOAT  [-1, D]    the user vector (D = model.output_dim, 64)

Inside the graph (stock TensorFlow ops only: no tensorflow_text, no ScaNN):

* every string is mapped to its vocabulary index by a ``tf.lookup.StaticHashTable`` initialised
  from the artifacts' vocab files, shipped as SavedModel assets (line i of the file = index i + 1);
  a value missing from the vocabulary maps to 0 (OOV), so unknown ids never fail;
* ``""`` in ``history`` is padding wherever it stands; the non-empty ids of a row are kept in order
  and only the most recent ``history_length`` (20) of them are used (the last ones in the row);
  ``hist_len`` is their count. An unknown (non-empty) item id counts as a click on the OOV item, as
  in the training examples. A row of only ``""`` (or a ``[B, 0]`` tensor) is an empty history.

The features then match the training examples (``user_<field>`` [B], ``hist_items`` [B, 20]
zero-padded at the end, ``hist_len`` [B]) and go through the trained ``model.user_embeddings``.

``assets.extra/tf_serving_warmup_requests`` holds a few ``PredictionLog`` records (TFRecord) so that
TF Serving runs the graph once before taking traffic. The request, response and log messages are
those of the ``tensorflow-serving-api`` package (``tensorflow_serving.apis``), pinned in setup.py.
"""
from __future__ import annotations

import errno
import inspect
import os
import re
import secrets
import shutil
from typing import Iterable, Mapping, Sequence

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow as tf

from micrec_tf.data.contract import HIST_ITEMS, HIST_LEN, user_feature

from export.item_index import read_vocab_file

SIGNATURE_NAME = "serving_default"
HISTORY_INPUT = "history"
OUTPUT_NAME = "user_embedding"
MODEL_NAME = "user_tower"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
_INPUT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


def input_names(user_fields: Sequence[str]) -> list:
    """Signature input names: the profile fields (in feature-spec order), then ``history``."""
    names = list(user_fields) + [HISTORY_INPUT]
    for name in user_fields:
        if name == HISTORY_INPUT:
            raise ValueError(f"a user profile field is named {HISTORY_INPUT!r}, which clashes with "
                             "the history input of the serving signature; rename the field")
        if not _INPUT_NAME_RE.match(name):
            raise ValueError(f"user profile field {name!r} is not usable as a serving input name "
                             "(letters, digits, '_', '.', '-'; starting with a letter)")
    return names


def input_specs(user_fields: Sequence[str]) -> dict:
    specs = {f: tf.TensorSpec([None], tf.string, name=f) for f in user_fields}
    specs[HISTORY_INPUT] = tf.TensorSpec([None, None], tf.string, name=HISTORY_INPUT)
    input_names(user_fields)
    return specs


def tower_vocab_names(user_fields: Sequence[str]) -> list:
    """The vocabularies the serving graph looks raw strings up in: ``item_id`` (the history),
    then ``user_<field>`` per profile field."""
    return ["item_id"] + [user_feature(f) for f in user_fields]


def _vocab_table(path: str, asset) -> tf.lookup.StaticHashTable:
    """Table string -> line number (0-based) of ``path``; -1 when missing."""
    size = len(read_vocab_file(path))
    init = tf.lookup.TextFileInitializer(
        asset, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
        tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, vocab_size=size if size else None)
    return tf.lookup.StaticHashTable(init, default_value=-1)


class UserTowerModule(tf.Module):
    """Raw strings -> vocabulary indices -> ``model.user_embeddings`` (see the module docstring).

    ``model``: a built model with ``user_embeddings(features) -> [B, D]``.
    ``vocab_files``: vocab name -> path (``item_id`` and ``user_<field>`` for each profile field).
    Only the model's variables are tracked, not the Keras objects, so saving never goes through
    Keras' own (layer-by-layer) SavedModel serialisation.
    """

    def __init__(self, model, user_fields: Sequence[str], vocab_files: Mapping[str, str],
                 history_length: int):
        super().__init__(name="user_tower")
        self._model = model  # kept out of the object graph, see __setattr__
        self._user_fields = tuple(user_fields)
        self.history_length = int(history_length)
        build_variables(model, self._user_fields, self.history_length)
        self.model_variables = list(model.variables)
        self.vocab_assets, self.tables = {}, {}
        for name in tower_vocab_names(self._user_fields):
            if name not in vocab_files:
                raise KeyError(f"vocab file for {name!r} missing (have {sorted(vocab_files)})")
            asset = tf.saved_model.Asset(vocab_files[name])
            self.vocab_assets[name] = asset
            self.tables[name] = _vocab_table(vocab_files[name], asset)
        self._takes_training = "training" in _parameters(model.user_embeddings)

    def __setattr__(self, name, value):
        if name == "_model":  # keep the Keras model out of the object graph
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def _lookup(self, vocab: str, values: tf.Tensor) -> tf.Tensor:
        idx = self.tables[vocab].lookup(values)
        return tf.where(idx < 0, tf.zeros_like(idx), idx + 1)

    def features(self, inputs: Mapping[str, tf.Tensor]) -> dict:
        """The model's integer features from the raw string inputs."""
        feats = {}
        for f in self._user_fields:
            name = user_feature(f)
            feats[name] = self._lookup(name, tf.reshape(inputs[f], [-1]))
        hist = inputs[HISTORY_INPUT]
        kept = tf.ragged.boolean_mask(hist, tf.not_equal(hist, ""))
        recent = kept[:, -self.history_length:]
        padded = recent.to_tensor(default_value="", shape=[None, self.history_length])
        idx = self._lookup("item_id", padded)
        feats[HIST_ITEMS] = tf.where(tf.equal(padded, ""), tf.zeros_like(idx), idx)
        feats[HIST_LEN] = tf.cast(recent.row_lengths(), tf.int64)
        return feats

    @tf.function
    def serve(self, **inputs):
        feats = self.features(inputs)
        if self._takes_training:
            vec = self._model.user_embeddings(feats, training=False)
        else:
            vec = self._model.user_embeddings(feats)
        return {OUTPUT_NAME: tf.cast(vec, tf.float32)}

    def concrete_function(self):
        return self.serve.get_concrete_function(**input_specs(self._user_fields))


def fold_text_fields(model) -> int:
    """Folds the text projection of every item text field of ``model``
    (:meth:`~micrec_tf.layers_text.ItemTextFieldEmbeddings.fold_text_projection`: a ``[V, D]``
    table instead of the ``[V, D_t]`` text vectors and their projection); returns how many
    layers were folded (0 for a model without ``model.item_text``). Export only."""
    from micrec_tf.layers_text import ItemTextFieldEmbeddings

    layers = [m for m in model.submodules if isinstance(m, ItemTextFieldEmbeddings)]
    for layer in layers:
        layer.fold_text_projection()
    return len(layers)


def build_variables(model, user_fields: Sequence[str], history_length: int) -> None:
    """Runs both towers once on a dummy batch, so that lazily built Keras layers create (and a
    deferred checkpoint restore fills) every variable before they are collected or compared."""
    feats = {user_feature(f): np.zeros([1], np.int64) for f in user_fields}
    feats[HIST_ITEMS] = np.zeros([1, int(history_length)], np.int64)
    feats[HIST_LEN] = np.zeros([1], np.int64)
    model.user_embeddings(feats)
    model.item_embeddings(np.zeros([1], np.int64))


def _parameters(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def save_user_tower(model, user_fields: Sequence[str], vocab_files: Mapping[str, str],
                    history_length: int, out_dir: str,
                    warmup_requests: Sequence[Mapping] | None = None) -> dict:
    """Writes the user-tower SavedModel (+ warmup requests) to ``out_dir``; returns its description.

    ``warmup_requests``: a few requests in columnar form ``{input name: list}`` (see
    :func:`columnar`), written to ``assets.extra/tf_serving_warmup_requests``.
    """
    module = UserTowerModule(model, user_fields, vocab_files, history_length)
    concrete = module.concrete_function()
    tracked = {id(v) for v in module.model_variables}
    missing = [v.name for v in concrete.variables if id(v) not in tracked]
    if missing:
        raise RuntimeError(f"the user tower reads variables that model.variables does not list: "
                           f"{missing[:5]}")
    # Only the variables the serving function reads are saved (not the item MLP, the CL
    # projectors, nor a text table that fold_text_fields replaced): same outputs, fewer bytes.
    read = {id(v) for v in concrete.variables}
    module.model_variables = [v for v in module.model_variables if id(v) in read]
    tf.saved_model.save(module, out_dir, signatures={SIGNATURE_NAME: concrete})
    if warmup_requests:
        write_warmup_requests(os.path.join(out_dir, WARMUP_FILE), warmup_requests)
    out_dim = concrete.structured_outputs[OUTPUT_NAME].shape[-1]
    return {
        "signature_name": SIGNATURE_NAME,
        "method_name": "tensorflow/serving/predict",
        "inputs": {**{f: {"dtype": "string", "shape": [-1]} for f in user_fields},
                   HISTORY_INPUT: {"dtype": "string", "shape": [-1, -1]}},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": [-1, out_dim]}},
        "history_length": int(history_length),
        "history_order": "oldest first, padded with \"\" at the end; the last "
                         f"{int(history_length)} non-empty ids are used",
        "unknown_values": "map to index 0 (OOV)",
        "warmup_requests": len(warmup_requests or []),
    }


# ----------------------------------------------------------------------------- request helpers
def columnar(rows: Sequence[Mapping], user_fields: Sequence[str]) -> dict:
    """Row dicts ``{field: str, "history": [ids]}`` -> columnar lists, histories padded with "".

    Missing profile fields become "" and a missing history is empty. Only the most recent
    ``history`` ids matter to the model, but all are passed through (the graph keeps the last 20).
    """
    hists = [[str(x) for x in (row.get(HISTORY_INPUT) or [])] for row in rows]
    width = max([len(h) for h in hists] + [0])
    out = {f: [str(row.get(f, "") if row.get(f) is not None else "") for row in rows]
           for f in user_fields}
    out[HISTORY_INPUT] = [h + [""] * (width - len(h)) for h in hists]
    return out


def encode_strings(value) -> np.ndarray:
    """Any nested list / array of str or bytes -> object array of UTF-8 ``bytes``."""
    arr = np.asarray(value, dtype=object)
    flat = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.ravel()]
    return np.asarray(flat + [b""], dtype=object)[:-1].reshape(arr.shape)


# ----------------------------------------------------------------------------- warmup records
def serving_protos():
    """``(PredictionLog, PredictRequest, PredictResponse)``: the ``tensorflow-serving-api``
    messages.

    The package is imported here rather than at the top of the module so that the rest of
    ``export.serving`` (version listing, publishing) works in an environment that predates the pin.
    """
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError as e:  # pragma: no cover - a project dependency (setup.py)
        raise ImportError("export.serving needs the tensorflow-serving-api package (setup.py pins "
                          "tensorflow-serving-api==2.20.*); run `make install`. Received: "
                          f"{e}") from e
    return (prediction_log_pb2.PredictionLog, predict_pb2.PredictRequest,
            predict_pb2.PredictResponse)


def predict_request(cols: Mapping, model_name: str = MODEL_NAME,
                    signature_name: str = SIGNATURE_NAME):
    """A ``tensorflow.serving.PredictRequest`` for columnar string inputs (gRPC ``Predict``)."""
    _, PredictRequest, _ = serving_protos()
    req = PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = signature_name
    for name, value in cols.items():
        arr = encode_strings(value)
        req.inputs[name].CopyFrom(tf.make_tensor_proto(arr, dtype=tf.string, shape=arr.shape))
    return req


def write_warmup_requests(path: str, requests: Iterable[Mapping],
                          model_name: str = MODEL_NAME) -> int:
    """Writes one ``PredictionLog{predict_log{request}}`` TFRecord per columnar request."""
    PredictionLog, _, _ = serving_protos()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    with tf.io.TFRecordWriter(path) as writer:
        for cols in requests:
            log = PredictionLog()
            log.predict_log.request.CopyFrom(predict_request(cols, model_name))
            writer.write(log.SerializeToString())
            n += 1
    return n


def tensor_to_numpy(tensor_proto) -> np.ndarray:
    """A ``TensorProto`` (e.g. a ``PredictResponse`` output) -> numpy array."""
    return tf.make_ndarray(tensor_proto)


def read_warmup_requests(path: str) -> list:
    """Parses the warmup file back: a list of ``{input name: numpy array}`` (strings as bytes)."""
    PredictionLog, _, _ = serving_protos()
    out = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = PredictionLog.FromString(record)
        if not log.HasField("predict_log"):
            raise ValueError("warmup record is not a predict_log")
        req = log.predict_log.request
        row = {"__model_spec__": (req.model_spec.name, req.model_spec.signature_name)}
        for name, tensor in req.inputs.items():
            row[name] = tensor_to_numpy(tensor)
        out.append(row)
    return out


def copy_tree_linked(src: str, dst: str) -> None:
    """Copies ``src`` to ``dst`` with hard links where the file system allows (copies otherwise)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
        return d

    shutil.copytree(src, dst, copy_function=link_or_copy)


# ----------------------------------------------------------------------------- TF Serving base path
SERVING_DIR = "serving"
TMP_PREFIX = ".tmp-"


def published_versions(export_root: str) -> list:
    """Published versions (ints, ascending) under ``exports/<name>``: the all-digit directories
    holding a metadata.json (a version is assembled under a dot name and renamed whole)."""
    if not os.path.isdir(export_root):
        return []
    return sorted(int(d) for d in os.listdir(export_root)
                  if d.isdigit() and os.path.isfile(os.path.join(export_root, d, "metadata.json")))


def latest_version(export_root: str) -> int | None:
    """The newest of :func:`published_versions` (None when there is none)."""
    versions = published_versions(export_root)
    return versions[-1] if versions else None


def version_dir(export_root: str, version: int | str | None = None) -> str:
    """``exports/<name>/<version>``: ``version`` (it must hold a metadata.json) or, by default,
    :func:`latest_version`; ``FileNotFoundError`` naming the root when there is none."""
    if version is not None:
        vdir = os.path.join(export_root, str(version))
        if not os.path.exists(os.path.join(vdir, "metadata.json")):
            raise FileNotFoundError(f"no export version {version} under {export_root!r}")
        return vdir
    latest = latest_version(export_root)
    if latest is None:
        raise FileNotFoundError(f"no exported version under {export_root!r}: "
                                "run `make export` first")
    return os.path.join(export_root, str(latest))


def tmp_path(parent: str, version: int) -> str:
    """A fresh ``parent/.tmp-<version>-<pid>-<random>`` name (not created): readers skip dot names,
    and ``export_model.sweep_stale_tmp`` removes those whose pid no longer runs."""
    return os.path.join(parent, f"{TMP_PREFIX}{version}-{os.getpid()}-{secrets.token_hex(4)}")


def publish_serving_view(export_root: str, version: int) -> str:
    """Publishes ``exports/<name>/serving/<version>/`` = the version's ``user_tower/`` (hard links),
    with one rename; does nothing if it is already there (another process may have published it
    meanwhile: the two are the same files)."""
    parent = os.path.join(export_root, SERVING_DIR)
    target = os.path.join(parent, str(version))
    if os.path.exists(target):
        return target
    os.makedirs(parent, exist_ok=True)
    tmp = tmp_path(parent, version)
    try:
        copy_tree_linked(os.path.join(export_root, str(version), "user_tower"), tmp)
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_tree(path: str, version: int) -> None:
    """Removes the folder ``path`` as a reader sees it, at once: renamed to a dot name first
    (:func:`tmp_path`, which :func:`export_model.sweep_stale_tmp` removes if this process dies
    during the deletion), then deleted."""
    tmp = tmp_path(os.path.dirname(path), version)
    os.rename(path, tmp)
    shutil.rmtree(tmp)


def prune_versions(export_root: str, keep: int, log=print) -> list:
    """Keeps the newest ``keep`` (>= 2) :func:`published_versions` of ``export_root`` and removes
    the older ones (``export.keep_versions``), each one's TF Serving view ``serving/<version>``
    first (TF Serving then unloads it; a kill between the two leaves a published version whose
    view the next :func:`repair_serving_views` restores), then the version folder. Returns the
    removed versions, ascending. ``keep`` 0 removes nothing."""
    if keep == 0:
        return []
    if not isinstance(keep, int) or keep < 2:
        raise ValueError(f"prune_versions: keep must be 0 or an int >= 2. Received: keep={keep!r}")
    removed = published_versions(export_root)[:-keep]
    for v in removed:
        view = os.path.join(export_root, SERVING_DIR, str(v))
        if os.path.isdir(view):
            remove_tree(view, v)
        remove_tree(os.path.join(export_root, str(v)), v)
    if removed:
        log(f"[export] removed {len(removed)} old version(s) {removed} (export.keep_versions="
            f"{keep}: the newest {keep} stay)")
    return removed


def served_versions(export_root: str) -> list:
    """The :func:`published_versions` that TF Serving also sees (``serving/<version>`` exists);
    all of them for a root without ``serving/`` (not made by the export)."""
    versions = published_versions(export_root)
    if not os.path.isdir(os.path.join(export_root, SERVING_DIR)):
        return versions
    return [v for v in versions if os.path.isdir(os.path.join(export_root, SERVING_DIR, str(v)))]


# errno values of a serving/ folder that cannot be written (read-only mount, permissions, full).
UNWRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def repair_serving_views(export_root: str, log=print, unwritable: list | None = None) -> list:
    """Publishes the missing ``serving/<version>`` of every published version; returns them.

    An export publishes the version directory first and its serving view second; one killed
    between the two leaves a version that retrieval would use while TF Serving still serves the
    previous user tower. Every export and every retrieval start-up call this, so the two views
    agree again. Only a root with a ``serving/`` directory (made by the export) is touched.

    ``unwritable``: a list to collect ``(version, OSError)`` for the views that cannot be written
    (``serving/`` read-only or full, see ``UNWRITABLE_ERRNOS``) instead of raising; the caller
    then decides which version to use (retrieval: the newest of :func:`served_versions`).
    """
    if not os.path.isdir(os.path.join(export_root, SERVING_DIR)):
        return []
    missing = [v for v in published_versions(export_root)
               if not os.path.isdir(os.path.join(export_root, SERVING_DIR, str(v)))]
    repaired = []
    for v in missing:
        try:
            publish_serving_view(export_root, v)
        except OSError as err:
            if unwritable is None or err.errno not in UNWRITABLE_ERRNOS:
                raise
            unwritable.append((v, err))
            continue
        repaired.append(v)
        log(f"[export] repaired half-published version {v}: created "
            f"{os.path.join(export_root, SERVING_DIR, str(v))} from its user_tower/ "
            "(TF Serving now serves the same user tower that retrieval uses)")
    return repaired

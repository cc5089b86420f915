"""Export versions for an online service: load, warm up, hot-swap, release (issue 30).

::

    manager = VersionManager("exports/ml-1m", poll_s=10.0)
    manager.start()                        # newest loadable version, loaded + warmed, or an error
    with manager.acquire() as v:           # v: LoadedVersion, held until the block ends
        ids, scores = v.retriever.retrieve(request, k=500, exclude="history")
        answered_by = v.version
    manager.status()                       # {"version": 1733560000, "state": "AVAILABLE",
                                           #  "refused": {1733570000: "OSError: ..."}}
    manager.stop()

**Which versions.** A candidate is a published version (``exports/<name>/<digits>/`` holding a
metadata.json, :func:`export.serving.published_versions`) that TF Serving would serve too
(:func:`export.serving.served_versions`: ``serving/<version>`` exists, or the root has no
``serving/``). An export publishes the version and then its serving view with two renames, so a
candidate is complete, and the service and a TF Serving beside it never answer from different
versions for long. A version left half-published by a killed export is repaired by the next
export or retrieval start-up (``micrec_tf.retrieval.resolve_version_dir``), never here: this module
**never writes into the export tree** (read-only mounts work). It opens files for reading only
and loads the :class:`~micrec_tf.retrieval.Retriever` from the version folder directly, not
through ``Retriever.load`` (whose start-up repair writes ``serving/``).

**Start.** :meth:`VersionManager.start` tries the candidates newest first and keeps the first one
that loads and warms up; each one that fails is refused (reason logged once, kept in
:meth:`VersionManager.status`). No loadable version: :class:`NoLoadableVersionError`, one line.
So a restart (after SIGKILL too) serves the same version as before, unless a newer loadable one
was published meanwhile.

**Hot-swap.** A background thread lists the candidates every ``poll_s`` seconds; for one newer
than the version serving, not refused before, it loads and warms the newest (falling back to the
next newer one when that fails) while the old version keeps serving, then swaps the current
version under a lock (one assignment: a request sees the old or the new version, never a mix).
A version whose load or warm-up fails is refused and never retried by this manager (versions are
immutable once published; a restart tries again). Versions deleted or rolled back are not
followed: the version serving stays until a newer one is published.

**Release.** :meth:`VersionManager.acquire` counts references: a request that acquired the old
version before the swap keeps using its objects to the end of its ``with`` block, and the old
version is released (:meth:`LoadedVersion.release`: the manager's references to the SavedModel,
the retriever and the item vectors dropped) when the last such block ends, or at the swap if
none is open.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterator

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np

from export import serving
from micrec_tf.retrieval import Retriever

# Users in the synthetic warm-up request of a version without a warm-up file.
_SYNTHETIC_USERS = 2
# Neighbours a warm-up search asks for at most (the export's top_k when smaller).
_WARMUP_K = 500
# Characters of a refusal reason kept in status() and the log line.
_REASON_CHARS = 400

# Manager states, as TF Serving's model status names them.
START, LOADING, AVAILABLE, END = "START", "LOADING", "AVAILABLE", "END"


class NoLoadableVersionError(RuntimeError):
    """:meth:`VersionManager.start` found no version that loads and warms up; one line."""


class LoadedVersion:
    """One export version loaded once for serving.

    Attributes:
        version: int, the version number (the folder name).
        path: str, ``exports/<name>/<version>``.
        user_tower: the SavedModel's ``serving_default`` signature function: keyword string
            tensors (``<profile field>: [B]``, ``history: [B, L]``) -> ``{"user_embedding":
            float32 [B, D]}``.
        retriever: :class:`micrec_tf.retrieval.Retriever` of this version (same signature
            function; item vectors float32 [N, D]; ScaNN searcher or brute force).
        specs: ``{input name: export.rest.InputSpec}`` of the signature, for
            ``export.rest.parse_request``.
        released: bool, True once :meth:`release` dropped the objects above (then ``None``).
        load_s, warmup_s: float seconds the manager spent loading and warming this version
            (None until it did; for logs and the service's metrics, e.g. the switch time).
    """

    def __init__(self, version: int, path: str, retriever: Retriever):
        self.version, self.path = int(version), path
        self.retriever = retriever
        self.user_tower = retriever.signature_fn
        self.specs = retriever.specs
        self.released = False
        self.load_s: float | None = None
        self.warmup_s: float | None = None
        self._refs = 0  # guarded by the owning VersionManager's lock

    @classmethod
    def load(cls, path: str) -> "LoadedVersion":
        """Loads version folder ``path`` (read-only: nothing is written, nothing repaired).

        Raises on a missing or corrupt part (metadata.json, the SavedModel, the item vectors,
        the ScaNN index) and when the item ids and vectors disagree in count.
        """
        name = os.path.basename(os.path.normpath(path))
        if not name.isdigit():
            raise ValueError(f"{path!r} is not a version folder (its name must be all digits)")
        retriever = Retriever.load_version_dir(path)
        ids, vectors = retriever.ids, retriever.vectors
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"item_embeddings: {len(ids)} ids for vectors of shape "
                             f"{tuple(vectors.shape)}")
        return cls(int(name), path, retriever)

    def release(self) -> None:
        """Drops this object's references to the SavedModel, retriever and vectors (memory is
        freed once no caller holds them either); ``released`` becomes True."""
        self.retriever = self.user_tower = None
        self.released = True

    def __repr__(self):
        gone = ", released" if self.released else ""
        return f"LoadedVersion({self.version}, {self.path!r}{gone})"


def warm_up(version: LoadedVersion) -> int:
    """Runs the version's warm-up requests through its user tower and search; returns how many
    users were run.

    Requests: ``user_tower/assets.extra/tf_serving_warmup_requests`` (the PredictionLog file TF
    Serving replays, written by the export), or, when the file is absent, a synthetic batch of
    unknown users without history. Raises when the tower's output is not float32 [B, D] with
    the item vectors' D, holds non-finite values, or the search returns the wrong shape.
    """
    r = version.retriever
    path = os.path.join(version.path, "user_tower", serving.WARMUP_FILE)
    if os.path.exists(path):
        batches = [{name: value.tolist() for name, value in row.items()
                    if not name.startswith("__")}
                   for row in serving.read_warmup_requests(path)]
    else:
        batches = [[{**{f: "" for f in r.user_fields}, serving.HISTORY_INPUT: []}]
                   * _SYNTHETIC_USERS]
    k = max(1, min(_WARMUP_K, r.top_k, r.vectors.shape[0]))
    users = 0
    for batch in batches:
        vectors = r.user_vectors(batch)
        b = vectors.shape[0]
        if vectors.ndim != 2 or vectors.shape[1] != r.vectors.shape[1]:
            raise ValueError(f"user tower output shape {tuple(vectors.shape)} does not match "
                             f"item vectors of dimension {r.vectors.shape[1]}")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("user tower returned non-finite values on the warm-up requests")
        ids, scores = r.search(vectors, k)
        if ids.shape != (b, k) or scores.shape != (b, k):
            raise ValueError(f"search returned shape {ids.shape} for {b} users and k={k}")
        users += b
    if not users:
        raise ValueError(f"the warm-up file {path} holds no request")
    return users


def _reason(err: BaseException) -> str:
    """One line: ``<ExceptionType>: <first line of the message>``, at most _REASON_CHARS."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


class VersionManager:
    """Serves the newest loadable version of an export root and hot-swaps newer ones.

    Args:
        export_dir: str, ``exports/<name>`` (the export root, not a version folder).
        poll_s: float > 0, seconds between two listings of the root by the background thread.
        load_fn: ``(version_dir: str) -> LoadedVersion``; default :meth:`LoadedVersion.load`.
        warmup_fn: ``(LoadedVersion) -> Any``, raising when the version must be refused;
            default :func:`warm_up`.
        log: ``(str) -> None`` for one-line messages (loads, swaps, refusals, releases).

    See the module docstring for what is a candidate, when a swap happens and when a version
    is released.
    """

    def __init__(self, export_dir: str, poll_s: float = 10.0,
                 load_fn: Callable[[str], LoadedVersion] | None = None,
                 warmup_fn: Callable[[LoadedVersion], object] | None = None,
                 log: Callable[[str], None] = print):
        if not isinstance(export_dir, (str, os.PathLike)):
            raise ValueError(f"export_dir must be a path. Received: export_dir={export_dir!r}")
        if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or not poll_s > 0:
            raise ValueError(f"poll_s must be a number > 0. Received: poll_s={poll_s!r}")
        self.export_dir = os.fspath(export_dir)
        self.poll_s = float(poll_s)
        self._load = load_fn or LoadedVersion.load
        self._warm = warmup_fn or warm_up
        self._log = log
        self._lock = threading.Lock()  # guards _current, _state, _refused, refcounts
        self._poll_lock = threading.Lock()
        self._current: LoadedVersion | None = None
        self._state = START
        self._refused: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        """True while a warmed-up version is serving (after :meth:`start`, before :meth:`stop`)."""
        with self._lock:
            return self._state == AVAILABLE and self._current is not None

    @property
    def version(self) -> int | None:
        """The version serving now (None before :meth:`start` and after :meth:`stop`)."""
        with self._lock:
            return self._current.version if self._current is not None else None

    def candidates(self) -> list:
        """Complete versions (ascending ints): published and served by TF Serving too."""
        return serving.served_versions(self.export_dir)

    def start(self) -> LoadedVersion:
        """Loads and warms the newest loadable version (synchronously), then starts polling.

        Raises :class:`NoLoadableVersionError` (one line: the root, the versions tried and the
        newest one's reason) when no candidate loads and warms up.
        """
        if self._thread is not None or self._state == END:
            raise RuntimeError("VersionManager.start() may be called once")
        with self._lock:
            self._state = LOADING
        try:
            versions = self.candidates()
        except OSError as err:
            self._set_state(END)
            raise NoLoadableVersionError(f"cannot list {self.export_dir!r}: {_reason(err)}") \
                from None
        loaded = self._load_first(sorted(versions, reverse=True))
        if loaded is None:
            self._set_state(END)
            tried = [v for v in sorted(versions, reverse=True) if v in self._refused]
            if not tried:
                raise NoLoadableVersionError(
                    f"no complete export version under {self.export_dir!r} (a version needs "
                    f"<version>/metadata.json and, where serving/ exists, serving/<version>): "
                    "run `make export` first")
            raise NoLoadableVersionError(
                f"no loadable export version under {self.export_dir!r}: refused "
                f"{', '.join(map(str, tried))}; version {tried[0]}: {self._refused[tried[0]]}")
        with self._lock:
            self._current, self._state = loaded, AVAILABLE
        self._log(f"[versions] serving version {loaded.version} from {loaded.path} (loaded in "
                  f"{loaded.load_s:.1f} s, warmed up in {loaded.warmup_s:.1f} s)")
        self._thread = threading.Thread(target=self._poll_loop, name="version-poller",
                                        daemon=True)
        self._thread.start()
        return loaded

    @contextlib.contextmanager
    def acquire(self) -> Iterator[LoadedVersion]:
        """``with manager.acquire() as v``: the current version, held (not released by a swap)
        until the block ends. Raises RuntimeError when nothing is serving."""
        with self._lock:
            v = self._current
            if v is None or self._state != AVAILABLE:
                raise RuntimeError(f"no version is serving (state {self._state})")
            v._refs += 1
        try:
            yield v
        finally:
            with self._lock:
                v._refs -= 1
                drop = v._refs == 0 and v is not self._current and not v.released
            if drop:
                self._release(v)

    def poll_once(self) -> int | None:
        """One poll now (what the background thread does every ``poll_s``): loads, warms and
        swaps to the newest newer candidate that is not refused; returns the version swapped
        to, or None."""
        with self._poll_lock:  # one load at a time (the thread, or a caller)
            current = self.version
            if current is None:
                return None
            newer = [v for v in self.candidates() if v > current and v not in self._refused]
            loaded = self._load_first(sorted(newer, reverse=True))
            if loaded is None:
                return None
            with self._lock:
                stopped = self._state != AVAILABLE
                if not stopped:
                    old, self._current = self._current, loaded
                    drop = old._refs == 0
            if stopped:  # stop() ran while loading: never serve it
                self._release(loaded)
                return None
            self._log(f"[versions] swapped version {old.version} -> {loaded.version} (loaded "
                      f"in {loaded.load_s:.1f} s, warmed up in {loaded.warmup_s:.1f} s)"
                      + ("" if drop else f" (requests still on {old.version} finish there)"))
            if drop:
                self._release(old)
            return loaded.version

    def status(self) -> dict:
        """``{"version": int | None, "state": str, "refused": {version: reason}}``; ``state`` is
        ``START``, ``LOADING`` (start() running), ``AVAILABLE`` or ``END`` (stopped, or start()
        failed), TF Serving's state names."""
        with self._lock:
            return {"version": self._current.version if self._current is not None else None,
                    "state": self._state, "refused": dict(self._refused)}

    def stop(self, timeout: float | None = None) -> None:
        """Stops polling (waits up to ``timeout`` for a load in progress) and releases the
        current version once no request holds it; ``ready`` becomes False."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._lock:
            v, self._current, self._state = self._current, None, END
            drop = v is not None and v._refs == 0
        if drop:
            self._release(v)

    # ------------------------------------------------------------------ internals
    def _load_first(self, versions: list) -> LoadedVersion | None:
        """The first of ``versions`` that loads and warms up; refuses the ones that fail."""
        for v in versions:
            if v in self._refused or self._stop.is_set():
                continue
            path = os.path.join(self.export_dir, str(v))
            loaded = None
            try:
                t0 = time.monotonic()
                loaded = self._load(path)
                t1 = time.monotonic()
                self._warm(loaded)
                loaded.load_s, loaded.warmup_s = t1 - t0, time.monotonic() - t1
            except Exception as err:  # noqa: BLE001  (any failure refuses the version)
                reason = _reason(err)
                with self._lock:
                    self._refused[v] = reason
                self._log(f"[versions] refused version {v} ({path}): {reason}; "
                          + (f"version {self.version} keeps serving" if self.version is not None
                             else "trying an older version"))
                if loaded is not None:
                    loaded.release()
                continue
            return loaded
        return None

    def _poll_loop(self) -> None:
        last_error = None
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
                last_error = None
            except Exception as err:  # noqa: BLE001  (listing the root failed: keep serving)
                reason = _reason(err)
                if reason != last_error:
                    self._log(f"[versions] cannot poll {self.export_dir!r}: {reason}; "
                              f"version {self.version} keeps serving")
                last_error = reason

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state

    def _release(self, v: LoadedVersion) -> None:
        v.release()
        self._log(f"[versions] released version {v.version}")

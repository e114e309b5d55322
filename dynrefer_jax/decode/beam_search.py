"""Greedy and beam-search decoding as one jit-able function: static shapes, KV cache, batched.

    model = functional.merge(graphdef, params)           # inside jax.jit
    ids, scores = generate(model, encoder_states, encoder_mask, num_beams=2, max_new_tokens=20,
                           min_length=1, repetition_penalty=1.5, length_penalty=0.0)

The model provides the decoding protocol (see models/t5.py):
    logits, cache = model.decode_start(encoder_states, encoder_mask, max_new_tokens)
    logits, cache = model.decode_step(token, cache, index)
where logits are float32[N, V] for the next token, `index` is the 0-based position of `token`
among generated tokens, and `cache = {"state": ..., "static": ...}` has every leaf batched on
axis 0; "state" is reordered when beams are reshuffled, "static" never changes.

Settings mean what they mean in transformers' `generate` (v5 vectorised beam search), which the
tests check token for token:
- `max_new_tokens`: generated tokens (EOS included); the prompt is `decoder_start_token_id`
  (encoder-decoder: prompt length 1) or nothing (decoder-only prefix: pass None, length 0).
- `min_length`: EOS is forbidden while prompt length + generated tokens < min_length (HF counts the
  decoder start token, so min_length=1 is a no-op for T5).
- `repetition_penalty`: every token already in the prompt + generated sequence (T5: the start
  token 0 included) has its score s replaced by s * p if s < 0 else s / p. Greedy applies it to
  raw logits; beam search to log-softmax scores (as HF does).
- `length_penalty`, `early_stopping` (False, True or "never"): HF's beam finalisation: the 2K best
  candidates are kept per step, candidates among the top K that end (EOS or max length) are
  finalised with score sum(logprobs) / generated_len ** length_penalty, the rest continue; a batch
  row stops accepting hypotheses once its best running beam cannot beat its worst finished one.

Returns `(ids int32[B, max_new_tokens], scores float32[B])`: ids without the start token,
`pad_token_id` after EOS; the score is the beam's final score (beam search) or, for greedy,
sum of log-softmax(processed logits) of the chosen tokens / len ** length_penalty (HF has none).
exp(score) is the caption confidence used by dense-captioning mAP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BIG = -1.0e9  # HF's "impossible" offset; kept identical so ties/rounding behave the same.


def _penalize(scores: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """HF RepetitionPenaltyLogitsProcessor on float[N, V] given bool[N, V] occurrence masks."""
  if isinstance(penalty, (int, float)) and penalty == 1.0:
    return scores  # static no-op: skip the [N, V] select
  return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def _min_length(scores: jax.Array, cur_len: jax.Array, min_length: int, eos: int) -> jax.Array:
  """HF MinLengthLogitsProcessor: -inf on EOS while cur_len (prompt included) < min_length."""
  block = (cur_len < min_length) & (jnp.arange(scores.shape[-1]) == eos)
  return jnp.where(block, -jnp.inf, scores)


def _mark(seen: jax.Array, tokens: jax.Array) -> jax.Array:
  """seen: bool[N, V]; tokens: int[N] -> seen with seen[n, tokens[n]] = True."""
  return seen.at[jnp.arange(seen.shape[0]), tokens].set(True)


def generate(model, encoder_states: jax.Array, encoder_mask: jax.Array, *, num_beams: int = 2,
             max_new_tokens: int = 20, min_length: int = 1, repetition_penalty: float = 1.0,
             length_penalty: float = 1.0, early_stopping: bool | str = False,
             eos_token_id: int = 1, pad_token_id: int = 0,
             decoder_start_token_id: int | None = 0) -> tuple[jax.Array, jax.Array]:
  """encoder_states: float[B, L, d]; encoder_mask: bool[B, L] -> (int32[B, T], float32[B]).

  num_beams, max_new_tokens, early_stopping and the token ids are static (Python values);
  min_length, repetition_penalty and length_penalty may also be traced scalars, so one compiled
  function serves every value of them.
  """
  settings = dict(max_new_tokens=max_new_tokens, min_length=min_length,
                  repetition_penalty=repetition_penalty,
                  length_penalty=length_penalty, eos=eos_token_id, pad=pad_token_id,
                  start=decoder_start_token_id)
  if num_beams == 1:
    return _greedy(model, encoder_states, encoder_mask, **settings)
  return _beam(model, encoder_states, encoder_mask, num_beams=num_beams,
               early_stopping=early_stopping, **settings)


def _next_logits(model, tokens, cache, i, max_new_tokens, logits):
  """decode_step unless token i was the last one allowed (saves one of max_new_tokens steps)."""
  return jax.lax.cond(i + 1 < max_new_tokens, lambda: model.decode_step(tokens, cache, i),
                      lambda: (logits, cache))


def _init_seen(n: int, vocab: int, start: int | None) -> jax.Array:
  seen = jnp.zeros((n, vocab), bool)
  return seen if start is None else seen.at[:, start].set(True)


def _greedy(model, enc, enc_mask, *, max_new_tokens, min_length, repetition_penalty,
            length_penalty, eos, pad, start):
  prompt_len = 0 if start is None else 1
  logits, cache = model.decode_start(enc, enc_mask, max_new_tokens)
  b, vocab = logits.shape
  carry = dict(i=jnp.int32(0), logits=logits, cache=cache, seen=_init_seen(b, vocab, start),
               ids=jnp.full((b, max_new_tokens), pad, jnp.int32), done=jnp.zeros((b,), bool),
               logp=jnp.zeros((b,), jnp.float32), length=jnp.zeros((b,), jnp.int32))

  def body(c):
    i = c["i"]
    s = _penalize(c["logits"].astype(jnp.float32), c["seen"], repetition_penalty)
    s = _min_length(s, prompt_len + i, min_length, eos)
    tok = jnp.argmax(s, axis=-1).astype(jnp.int32)
    tok_logp = jnp.take_along_axis(jax.nn.log_softmax(s, -1), tok[:, None], -1)[:, 0]
    live = ~c["done"]
    tok = jnp.where(live, tok, pad)
    logits, cache = _next_logits(model, tok, c["cache"], i, max_new_tokens, c["logits"])
    return dict(i=i + 1, logits=logits, cache=cache, seen=_mark(c["seen"], tok),
                ids=c["ids"].at[:, i].set(tok), done=c["done"] | (tok == eos),
                logp=c["logp"] + jnp.where(live, tok_logp, 0.0),
                length=c["length"] + live.astype(jnp.int32))

  def cond(c):
    return (c["i"] < max_new_tokens) & ~jnp.all(c["done"])

  c = jax.lax.while_loop(cond, body, carry)
  score = c["logp"] / jnp.maximum(c["length"], 1).astype(jnp.float32) ** length_penalty
  return c["ids"], score


def _beam(model, enc, enc_mask, *, num_beams, early_stopping, max_new_tokens, min_length,
          repetition_penalty, length_penalty, eos, pad, start):
  """HF `_beam_search` (transformers v5), vectorised over the batch with static shapes."""
  k, t = num_beams, max_new_tokens
  prompt_len = 0 if start is None else 1
  max_length = prompt_len + t
  logits, cache = model.decode_start(enc, enc_mask, t)
  b, vocab = logits.shape
  # The prompt is identical across beams: run it once per row, then copy it to every beam.
  rep = lambda x: jnp.repeat(x, k, axis=0)
  logits, cache = rep(logits), jax.tree.map(rep, cache)
  keep = 2 * k  # HF: max(2, 1 + n_eos) * num_beams
  top_mask = jnp.arange(keep) < k
  carry = dict(
      i=jnp.int32(0), go=jnp.bool_(True), logits=logits, cache=cache,
      seen=_init_seen(b * k, vocab, start),
      run_seq=jnp.full((b, k, t), pad, jnp.int32),
      run_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_BIG),
      seq=jnp.full((b, k, t), pad, jnp.int32),
      scores=jnp.full((b, k), _BIG, jnp.float32),
      finished=jnp.zeros((b, k), bool),
      unsatisfied=jnp.ones((b, 1), bool))
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

  def body(c):
    i = c["i"]
    cur_len = prompt_len + i
    logp = jax.nn.log_softmax(c["logits"].astype(jnp.float32), axis=-1)
    logp = _penalize(logp, c["seen"], repetition_penalty)
    logp = _min_length(logp, cur_len, min_length, eos)
    acc = (logp.reshape(b, k, vocab) + c["run_scores"][..., None]).reshape(b, k * vocab)
    topk_lp, topk_idx = jax.lax.top_k(acc, keep)              # [B, 2K]
    parent, tok = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
    topk_seq = gather(c["run_seq"], parent).at[:, :, i].set(tok)
    hits = (tok == eos) | (cur_len + 1 >= max_length)

    # Best K candidates that did not end continue.
    run_lp = topk_lp + hits.astype(jnp.float32) * _BIG
    _, nxt = jax.lax.top_k(run_lp, k)
    run_seq, run_scores = gather(topk_seq, nxt), gather(run_lp, nxt)
    run_parent, run_tok = gather(parent, nxt), gather(tok, nxt)

    # Candidates among the top K that ended compete with the finished hypotheses.
    just = hits & top_mask[None]
    fin = topk_lp / jnp.asarray(cur_len + 1 - prompt_len, jnp.float32) ** length_penalty
    full = jnp.all(c["finished"], -1, keepdims=True) & (early_stopping is True)
    fin = fin + full.astype(jnp.float32) * _BIG
    fin = fin + (~c["unsatisfied"]).astype(jnp.float32) * _BIG
    fin = fin + (~just).astype(jnp.float32) * _BIG
    m_seq = jnp.concatenate([c["seq"], topk_seq], 1)
    m_scores = jnp.concatenate([c["scores"], fin], 1)
    m_fin = jnp.concatenate([c["finished"], just], 1)
    _, best = jax.lax.top_k(m_scores, k)
    seq, scores, finished = gather(m_seq, best), gather(m_scores, best), gather(m_fin, best)

    # Reorder per-beam state to the surviving parents and feed their new tokens.
    rows = (jnp.arange(b)[:, None] * k + run_parent).reshape(-1)
    tokens = run_tok.reshape(-1)
    seen = _mark(c["seen"][rows], tokens)
    cache = dict(c["cache"], state=jax.tree.map(lambda x: x[rows], c["cache"]["state"]))

    # HF's early-stop heuristic, evaluated with the incremented length.
    best_len = (cur_len + 1 - prompt_len).astype(jnp.float32)
    if early_stopping == "never":
      best_len = jnp.where(length_penalty > 0.0, jnp.float32(max_length - prompt_len), best_len)
    best_running = run_scores[:, :1] / best_len ** length_penalty
    worst = jnp.where(finished, jnp.min(scores, 1, keepdims=True), _BIG)
    unsatisfied = c["unsatisfied"] & jnp.any(best_running > worst, -1, keepdims=True)
    go = (jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True))
          & ~jnp.all(hits))
    logits, cache = _next_logits(model, tokens, cache, i, t, c["logits"])
    return dict(i=i + 1, go=go, logits=logits, cache=cache, seen=seen, run_seq=run_seq,
                run_scores=run_scores, seq=seq, scores=scores, finished=finished,
                unsatisfied=unsatisfied)

  def cond(c):
    return c["go"] & (c["i"] < t)

  c = jax.lax.while_loop(cond, body, carry)
  return c["seq"][:, 0], c["scores"][:, 0]

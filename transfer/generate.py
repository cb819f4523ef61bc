"""Token generation for the causal decoders (``transfer.models.decoder_common.CausalLM``).

A left-padded batch of prompts is run once through a jitted prefill that fills a fixed-size KV cache of
``prompt length + max_new_tokens`` slots; then one compiled ``lax.while_loop`` feeds one token per row per step
and writes it at the cache's index. Shapes never change inside the loop, so nothing recompiles per token; a new
batch of the same shapes reuses both compilations, whatever its sampling values, EOS and pad ids (all traced);
greedy and sampling compile separately (``TRACES`` counts compilations, for tests).

Greedy at ``temperature == 0`` (``top_k``/``top_p`` are then ignored, as in transformers' ``do_sample=False``);
otherwise logits / temperature, then top-k, then nucleus (top-p) filtering, then a categorical draw keyed by
``seed`` and the step. A row that has emitted an EOS id emits ``pad_token_id`` afterwards; the loop stops early
when every row has finished, leaving pads in the remaining columns.
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Traces of each jitted function ('prefill', 'decode_loop'); each trace is one compilation.
TRACES: collections.Counter = collections.Counter()


class Sampler(NamedTuple):
  """Sampling settings as traced scalars (other values reuse the compilation): ``top_k`` 0 and ``top_p`` 1 mean
  no filtering."""
  temperature: jnp.ndarray
  top_k: jnp.ndarray
  top_p: jnp.ndarray


def choose(logits: jnp.ndarray, key, sampler: Sampler | None) -> jnp.ndarray:
  """(N, vocab) float32 logits -> (N,) int32 next tokens: greedy when ``sampler`` is None."""
  if sampler is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampler.temperature
  ordered = -jnp.sort(-logits, axis=-1)   # descending
  vocab = logits.shape[-1]
  # top-k: drop what is below the k-th best logit.
  k = jnp.where(sampler.top_k > 0, jnp.minimum(sampler.top_k, vocab), vocab)
  logits = jnp.where(logits < ordered[:, k - 1, None], -jnp.inf, logits)
  ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)
  # top-p: keep the smallest prefix whose mass reaches top_p (a token stays if the mass before it is below top_p).
  probs = jax.nn.softmax(ordered, axis=-1)
  kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < sampler.top_p, axis=-1, keepdims=True)
  threshold = jnp.where(sampler.top_p < 1, jnp.take_along_axis(ordered, kept - 1, axis=-1), -jnp.inf)
  logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('module', 'cache_len'))
def _prefill(module, variables, input_ids, attention_mask, rng, sampler, *, cache_len: int):
  TRACES['prefill'] += 1
  cache = module.init_cache(input_ids.shape[0], cache_len)
  logits, cache = module.apply(variables, input_ids, attention_mask, cache=cache, last_only=True,
                               method=module.decode)
  return choose(logits[:, -1], jax.random.fold_in(rng, 0), sampler), cache


@functools.partial(jax.jit, static_argnames=('module', 'max_new_tokens'))
def _decode_loop(module, variables, first, cache, rng, sampler, eos_table, pad, *, max_new_tokens: int):
  """``eos_table``: (vocab,) bool, true at EOS ids; ``pad``: () int32. Both are traced arrays of fixed shapes,
  so other EOS/pad ids reuse the compilation."""
  TRACES['decode_loop'] += 1
  n = first.shape[0]
  is_eos = lambda t: eos_table[t]
  out = jnp.full((n, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)

  def unfinished(state):
    step, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def step_fn(state):
    step, token, done, out, cache = state
    logits, cache = module.apply(variables, token[:, None], jnp.ones((n, 1), jnp.int32), cache=cache,
                                 last_only=True, method=module.decode)
    token = jnp.where(done, pad, choose(logits[:, -1], jax.random.fold_in(rng, step), sampler))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    return step + 1, token, done | is_eos(token), out, cache

  state = (jnp.asarray(1, jnp.int32), first, is_eos(first), out, cache)
  return jax.lax.while_loop(unfinished, step_fn, state)[3]


def _token_ids(value, what: str) -> tuple[int, ...]:
  values = () if value is None else tuple(value) if isinstance(value, (Sequence, np.ndarray)) else (value,)
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values):
    raise ValueError(f"generate: {what} must be a token id or a list of them, got {value!r}")
  return tuple(int(v) for v in values)


def generate(module, variables, input_ids, attention_mask, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_token_id=None,
             pad_token_id: int | None = None) -> np.ndarray:
  """(N, max_new_tokens) int32 new token ids for a left-padded batch of prompts.

  ``module`` is a ``CausalLM``; ``input_ids``/``attention_mask`` are (N, L), each row's padding before its
  tokens. ``eos_token_id``: an id or a list of ids, or None (generate ``max_new_tokens`` always).
  ``pad_token_id`` defaults to the first EOS id (transformers' choice), else 0.
  """
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f"generate: input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be "
                     "(batch, length)")
  if not np.isin(attention_mask, (0, 1)).all():
    raise ValueError("generate: attention_mask must hold only 0 and 1")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  lengths = attention_mask.sum(axis=1)
  empty = np.flatnonzero(lengths == 0)
  if empty.size:
    raise ValueError(f"generate: prompt row(s) {empty.tolist()} have no tokens (attention_mask all 0)")
  right_padded = np.flatnonzero((np.diff(attention_mask, axis=1) < 0).any(axis=1))
  if right_padded.size:
    raise ValueError(f"generate: prompt row(s) {right_padded.tolist()} have padding after a token; prompts must be "
                     "left-padded (every row's last slot a real token)")
  vocab = module.backbone.config.vocab_size
  real = input_ids[attention_mask == 1]
  outside = sorted(set(real[(real < 0) | (real >= vocab)].tolist()))
  if outside:
    raise ValueError(f"generate: input_ids outside the vocabulary [0, {vocab}): {outside[:10]}")
  context = module.backbone.config.max_position_embeddings
  longest = int(lengths.max())
  if longest > context:
    raise ValueError(f"generate: a prompt of {longest} tokens is longer than the model's context of {context} "
                     "positions")
  if longest + max_new_tokens > context:
    raise ValueError(f"generate: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
                     f"{longest + max_new_tokens} tokens, more than the model's context of {context} positions")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
    raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
  eos = _token_ids(eos_token_id, 'eos_token_id')
  if pad_token_id is not None and len(_token_ids(pad_token_id, 'pad_token_id')) != 1:
    raise ValueError(f"generate: pad_token_id must be one token id, got {pad_token_id!r}")
  pad = int(pad_token_id) if pad_token_id is not None else eos[0] if eos else 0

  sampler = None if temperature == 0 else Sampler(
      jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k or 0, jnp.int32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32))
  rng = jax.random.PRNGKey(seed)
  # Padding slots get id 0: any in-vocabulary id does (they are masked), an out-of-range one would gather NaN.
  ids = jnp.asarray(np.where(attention_mask == 1, input_ids, 0), jnp.int32)
  first, cache = _prefill(module, variables, ids, jnp.asarray(attention_mask, jnp.int32), rng, sampler,
                          cache_len=input_ids.shape[1] + int(max_new_tokens))
  eos_table = np.zeros(vocab, bool)
  eos_table[[e for e in eos if e < vocab]] = True   # an id outside the vocabulary is never emitted
  out = _decode_loop(module, variables, first, cache, rng, sampler, jnp.asarray(eos_table),
                     jnp.asarray(pad, jnp.int32), max_new_tokens=int(max_new_tokens))
  return np.asarray(out, np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m transfer.generate (--model SOURCE | --workdir DIR [--checkpoint C]) --prompt TEXT ...

def load_model(*, model: str | None = None, workdir: str | None = None, checkpoint="last"):
  """``(CausalLM module, variables, tokenizer, description)`` of a decoder checkpoint (``model``: a folder, hub id
  or short name) or of a causal-LM training run's checkpoint (``workdir``; its tokenizer is that of the checkpoint
  the run started from). Anything else (an encoder, a classification run) is a ValueError saying what it is."""
  from transfer import hf_export, models, pretrained
  if workdir is not None:
    model_cfg, module, variables, step = hf_export.causal_lm_from_workdir(workdir, checkpoint)
    source, description = hf_export.model_source(model_cfg), f"{workdir} step {step} ({model_cfg.name})"
  else:
    name, _ = pretrained.locate(model)
    fam = models.family(name)
    if fam.kind != "decoder":
      decoders = sorted(f.name for f in models.FAMILIES.values() if f.kind == "decoder")
      raise ValueError(f"--model {model!r} holds a {name} model, an {fam.kind}: generation needs a decoder "
                       f"({', '.join(decoders)})")
    module, variables = pretrained.load_pretrained(model)
    source, description = model, f"{model} ({name})"
  tokenizer = pretrained.tokenizer(source)
  tokenizer.check_vocab(module.backbone.config.vocab_size, source)
  return module, variables, tokenizer, description


def encode_prompts(tokenizer, prompts: Sequence[str], *, limit: int, truncate: bool, log=print):
  """Left-padded ``(input_ids, attention_mask)`` of the prompts with the tokenizer's own special tokens.

  A prompt of more than ``limit`` tokens is refused (ValueError listing each one's count), or with ``truncate``
  cut to its last ``limit`` tokens (special tokens kept), with a printed count. A prompt of no tokens (an empty
  one, for GPT-2) starts from the BOS token, else EOS, as unconditional generation does in transformers."""
  specials = len(tokenizer.prefix_ids) + len(tokenizer.suffix_ids)
  lengths = [specials + len(ids) for ids in tokenizer.tokens(list(prompts))]
  too_long = [(i + 1, n) for i, n in enumerate(lengths) if n > limit]
  if too_long:
    listed = ", ".join(f"prompt {i}: {n} tokens" for i, n in too_long[:8]) + (" ..." if len(too_long) > 8 else "")
    if not truncate:
      raise ValueError(f"{len(too_long)} of {len(prompts)} prompts do not fit: at most {limit} tokens fit the "
                       f"model's context with --max_new_tokens ({listed}); shorten them, lower --max_new_tokens, "
                       f"or pass --truncate to keep each one's last {limit} tokens")
    log(f"note: {len(too_long)} of {len(prompts)} prompts cut to their last {limit} tokens to fit the context "
        f"({listed})")
  enc = tokenizer.encode(list(prompts), max_length=limit, padding_side="left", truncation_side="left")
  ids, mask = enc.input_ids, enc.attention_mask
  empty = np.flatnonzero(mask.sum(axis=1) == 0)
  if empty.size:
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
      raise ValueError(f"prompt(s) {[int(i) + 1 for i in empty]} have no tokens and the tokenizer has no BOS or EOS "
                       "token to start from")
    if ids.shape[1] == 0:
      ids, mask = np.full((len(prompts), 1), tokenizer.pad_id, np.int32), np.zeros((len(prompts), 1), np.int32)
    ids[empty, -1], mask[empty, -1] = start, 1
  return ids, mask


def continuation_text(tokenizer, row) -> str:
  """The decoded new tokens of one row, up to (not including) the first stop token."""
  row = [int(t) for t in row]
  stops = set(tokenizer.stop_ids)
  end = next((i for i, t in enumerate(row) if t in stops), len(row))
  return tokenizer.decode(row[:end])


def main(argv=None) -> int:
  """``python -m transfer.generate``: prints each prompt's continuation (Python string literals, so spaces and
  newlines show). Exit 2 for a bad command line, 1 for a model, workdir or prompt that cannot be used."""
  import argparse
  import sys
  parser = argparse.ArgumentParser(
      prog="python -m transfer.generate",
      description="Continue prompts with a decoder checkpoint or a causal-LM training run (greedy by default).")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--model", help="a decoder checkpoint: a Hugging Face folder, cached hub id or short name")
  source.add_argument("--workdir", help="a causal-LM training run's workdir (its model and tokenizer)")
  parser.add_argument("--checkpoint", help="with --workdir: 'last' (default), 'best' or a step number")
  parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
  parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
  parser.add_argument("--top_k", type=int, default=None, help="sampling: keep the k most likely tokens")
  parser.add_argument("--top_p", type=float, default=None, help="sampling: keep the smallest set of mass top_p")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  parser.add_argument("--truncate", action="store_true",
                      help="cut a prompt too long for the context to its last tokens instead of refusing it")
  try:
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.workdir is None:
      parser.error("--checkpoint picks a checkpoint of --workdir; --model has none")
  except SystemExit as e:   # argparse's exit: 2 for a bad command line (message printed), 0 for --help
    return int(e.code or 0)
  try:
    module, variables, tokenizer, description = load_model(model=args.model, workdir=args.workdir,
                                                           checkpoint=args.checkpoint or "last")
    context = module.backbone.config.max_position_embeddings
    if args.max_new_tokens < 1 or args.max_new_tokens >= context:
      raise ValueError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1 and leave room for a prompt in "
                       f"the model's context of {context} positions")
    ids, mask = encode_prompts(tokenizer, args.prompt, limit=context - args.max_new_tokens, truncate=args.truncate)
    out = generate(module, variables, ids, mask, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   eos_token_id=list(tokenizer.stop_ids) or None, pad_token_id=tokenizer.pad_id)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  sampling = ("greedy" if args.temperature == 0 else
              f"sampling: temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, seed {args.seed}")
  print(f"{description}; {sampling}; up to {args.max_new_tokens} new tokens")
  for i, (prompt, row) in enumerate(zip(args.prompt, out), 1):
    print(f"[{i}] prompt: {prompt!r}")
    print(f"[{i}] continuation: {continuation_text(tokenizer, row)!r}")
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main())

"""Upstream -> downstream with a decoder, offline: pretrain a small GPT-2 on real unlabelled text, then fine-tune it
on SST-2 sentiment at 1%, 10% and 100% of the labels, against the same network from scratch.

  python experiments/decoder_transfer.py --workdir runs/decoder [--pretrain_steps 900] [--fractions 0.01,0.1,1]

No GPT weights install from the package registry, so the upstream step happens here:
1. Corpus: the training texts of ../shared/data (SST-2's 67,349 training sentences and AG News's 10,001 training
   articles), labels dropped. No split that anything is evaluated on: SST-2's dev sentences and AG News's test
   split stay out. (The SST-2 training sentences are also the downstream training inputs, as in semi-supervised
   pretraining on the target domain's unlabelled text; their labels are never seen upstream.)
2. A byte-level BPE tokenizer (4,096 tokens) trained on the corpus, and a GPT-2 architecture (4 layers, width 256,
   4 heads, 128 positions: 4.2M parameters) written as a Hugging Face folder (``arch/``).
3. Pretraining: ``configs/gpt_pretrain.py`` (causal LM; 2% of the documents held out for perplexity).
4. The result saved as a Hugging Face folder (``pretrained_hf/``: config.json, model.safetensors, tokenizer), which
   ``transfer.load_pretrained`` reads back and ``transformers`` can load.
5. Downstream: ``configs/gpt_sst2.py`` at each label fraction, from ``pretrained_hf`` and from scratch (the same
   architecture, random init); dev accuracy (872 sentences, touched once at the end of each run).

Each step is skipped when its output exists, so a rerun resumes. Results: ``WORKDIR/decoder_transfer.json`` and a
markdown table (printed), copied to ``--results`` when given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import gpt_pretrain, gpt_sst2  # noqa: E402
from transfer import train  # noqa: E402

EOS = "<|endoftext|>"
ARCH = dict(n_layer=4, n_embd=256, n_head=4, n_positions=128)
VOCAB = 4096


def shared_data() -> str:
  base = os.environ.get("TRANSFER_SHARED_DATA") or os.path.join(ROOT, "..", "shared", "data")
  if not os.path.isdir(os.path.join(base, "sst2")):
    raise SystemExit(f"needs the shared data (sst2/, ag_news/) at {base}: set $TRANSFER_SHARED_DATA")
  return base


def column(path: str, name: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    i = header.index(name)
    return [line.rstrip("\n").split("\t")[i].strip() for line in f if line.strip()]


def write_corpus(data: str, path: str) -> int:
  texts = column(os.path.join(data, "sst2", "train.tsv"), "sentence") + column(
      os.path.join(data, "ag_news", "train.tsv"), "text")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\n".join(t for t in texts if t) + "\n")
  return len(texts)


def write_architecture(folder: str, corpus: str) -> dict:
  """A byte-level BPE trained on the corpus and a GPT-2 config.json of its vocabulary: a from-scratch source."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  os.makedirs(folder, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train([corpus], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(folder, "tokenizer.json"))
  eos = tok.token_to_id(EOS)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
               "model_max_length": ARCH["n_positions"]}, f, indent=2)
  config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": tok.get_vocab_size(),
            "n_ctx": ARCH["n_positions"], **ARCH, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": eos, "eos_token_id": eos,
            "tie_word_embeddings": True}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return config


def run(config, workdir: str) -> dict:
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      print(f"finished earlier: {done}", flush=True)
      return json.load(f)
  return train.train(config, workdir)


def table(rows: list[dict]) -> str:
  lines = ["| labels | pretrained GPT | from scratch | gain |", "|---|---|---|---|"]
  for fraction in sorted({r["fraction"] for r in rows}):
    acc = {r["init"]: r["eval/accuracy"] for r in rows if r["fraction"] == fraction}
    n = rows[[r["fraction"] for r in rows].index(fraction)]["examples"]
    lines.append(f"| {fraction:.0%} ({n:,}) | {acc.get('pretrained', float('nan')):.3f} | "
                 f"{acc.get('scratch', float('nan')):.3f} | "
                 f"{acc.get('pretrained', float('nan')) - acc.get('scratch', float('nan')):+.3f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/decoder")
  parser.add_argument("--pretrain_steps", type=int, default=900)
  parser.add_argument("--fractions", default="0.01,0.1,1")
  parser.add_argument("--results", help="also write the JSON here (e.g. experiments/results/...json)")
  args = parser.parse_args()
  data, work = shared_data(), os.path.abspath(args.workdir)
  os.makedirs(work, exist_ok=True)
  out = {"arch": ARCH, "vocab": VOCAB, "pretrain_steps": args.pretrain_steps}

  corpus, arch = os.path.join(work, "corpus.txt"), os.path.join(work, "arch")
  if not os.path.exists(corpus):
    out["corpus_documents"] = write_corpus(data, corpus)
  if not os.path.exists(os.path.join(arch, "config.json")):
    write_architecture(arch, corpus)

  t0 = time.time()
  pretrain_dir = os.path.join(work, "pretrain")
  out["pretrain"] = run(gpt_pretrain.get_config(f"arch={arch},text={corpus},steps={args.pretrain_steps}"),
                        pretrain_dir)
  out["pretrain_wall_seconds"] = out["pretrain"]["wall_seconds"]
  hf_folder = os.path.join(work, "pretrained_hf")
  if not os.path.exists(os.path.join(hf_folder, "model.safetensors")):
    from transfer import hf_export, runs
    _, params, _, _ = runs.variables_from_workdir(pretrain_dir)
    with open(os.path.join(arch, "config.json")) as f:
      hf_config = json.load(f)
    hf_export.save_decoder(hf_folder, params, hf_config, tokenizer_folder=arch)
  print(f"pretrained: {hf_folder} (held-out perplexity {out['pretrain']['eval/perplexity']:.1f})", flush=True)

  rows = []
  for fraction in (float(f) for f in args.fractions.split(",")):
    for init, model in (("pretrained", hf_folder), ("scratch", arch)):
      name = f"sst2_{init}_{fraction:g}"
      config = gpt_sst2.get_config(f"init={init},model={model},fraction={fraction},data={data}/sst2")
      results = run(config, os.path.join(work, name))
      rows.append({"init": init, "fraction": fraction, "examples": config.data.train_examples or gpt_sst2.SST2_TRAIN,
                   "steps": config.total_steps, **results})
  out["downstream"] = rows
  out["total_wall_seconds"] = time.time() - t0
  text = table(rows)
  print("\nSST-2 dev accuracy (872 sentences), GPT-2 4x256 decoder, mean-pooled head\n\n" + text, flush=True)
  for path in filter(None, (os.path.join(work, "decoder_transfer.json"), args.results)):
    with open(path, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()

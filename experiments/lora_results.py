"""LoRA against full fine-tuning and a linear probe, at the same number of steps, for a text encoder, a CNN and a
decoder: accuracy, what trains, what it costs.

  python experiments/lora_results.py --workdir runs/lora [--results experiments/results/lora_DATE.json]

Rows (each a separate ``python -m transfer.train`` process, so its peak memory is its own):
  - text: ``configs/minilm_sst2_lora.py`` (all-MiniLM-L6-v2, SST-2: 8,000 training sentences, 250 steps of 32,
    dev accuracy on 872 sentences) in modes lora, full, probe;
  - vision: ``configs/hymenoptera_efficientnet.py`` (EfficientNet-Lite0 ImageNet weights, ants vs bees, 224 px,
    100 steps of 32, validation accuracy on 153 photos) in modes lora (conv adapters), finetune, frozen;
  - decoder: the GPT-2 4x256 of ``experiments/decoder_transfer.py`` pretrained here for ``--pretrain_steps`` on
    the unlabelled corpus, then ``configs/gpt_sst2.py`` at 10% of SST-2 in modes lora, full, probe.
Columns: accuracy; trainable parameters; optimizer-state bytes; the final checkpoint's bytes on disk; step time
(seconds per training step after the first, which compiles: it includes the end-of-run evaluation's share of the
last logging window); the process's peak resident memory. Each step is skipped when its output exists, and
``--results`` keeps the rows of the parts not run this time (rerun one part: ``--parts vision``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import decoder_transfer  # noqa: E402


def train_process(config_arg: str, workdir: str, *overrides: str) -> dict:
  """``python -m transfer.train`` in a process of its own; its results.json (reused when it exists)."""
  done = os.path.join(workdir, "results.json")
  if not os.path.exists(done):
    command = [sys.executable, "-m", "transfer.train", "--config", config_arg, "--workdir", workdir, *overrides]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
  with open(done) as f:
    return json.load(f)


def row(part: str, family: str, mode: str, results: dict, batch_size: int) -> dict:
  speed = results.get("train_examples_per_sec")
  return {"part": part, "family": family, "mode": mode, "accuracy": results["eval/accuracy"], "steps": results["step"],
          "trainable_params": results["trainable_params"], "frozen_params": results["frozen_params"],
          "optimizer_state_bytes": results["optimizer_state_bytes"], "checkpoint_bytes": results["checkpoint_bytes"],
          "step_seconds": batch_size / speed if speed else None, "wall_seconds": results["wall_seconds"],
          "peak_host_memory_bytes": results["peak_host_memory_bytes"], "feature_cache": results["feature_cache"]}


def table(rows: list[dict]) -> str:
  mb = lambda b: f"{b / 2**20:,.1f} MB"
  lines = ["| model, data | mode | accuracy | trainable params | optimizer state | checkpoint | step time | peak memory |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    step = f"{r['step_seconds']:.3f} s" if r["step_seconds"] else "-"
    lines.append(f"| {r['family']} | {r['mode']} | {r['accuracy']:.3f} | {r['trainable_params']:,} | "
                 f"{mb(r['optimizer_state_bytes'])} | {mb(r['checkpoint_bytes'])} | {step} | "
                 f"{r['peak_host_memory_bytes'] / 2**30:.2f} GB |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/lora")
  parser.add_argument("--pretrain_steps", type=int, default=400)
  parser.add_argument("--parts", default="text,vision,decoder")
  parser.add_argument("--results", help="also write the JSON here (e.g. experiments/results/...json)")
  args = parser.parse_args()
  data, work = decoder_transfer.shared_data(), os.path.abspath(args.workdir)
  os.makedirs(work, exist_ok=True)
  parts, rows, t0 = args.parts.split(","), [], time.time()
  if "text" in parts:
    for mode in ("lora", "full", "probe"):
      results = train_process(f"configs/minilm_sst2_lora.py:mode={mode},data={data}/sst2",
                              os.path.join(work, f"sst2_{mode}"))
      rows.append(row("text", "all-MiniLM-L6-v2, SST-2 8k", mode, results, 32))
  if "vision" in parts:
    for mode in ("lora", "finetune", "frozen"):
      results = train_process(f"configs/hymenoptera_efficientnet.py:mode={mode}", os.path.join(work, f"ants_{mode}"),
                              f"--config.data.data_dir={data}/hymenoptera", "--config.total_steps=100",
                              "--config.eval_every=0")
      rows.append(row("vision", "EfficientNet-Lite0, hymenoptera", mode, results, 32))
  if "decoder" in parts:
    corpus, arch = os.path.join(work, "corpus.txt"), os.path.join(work, "arch")
    if not os.path.exists(corpus):
      decoder_transfer.write_corpus(data, corpus)
    if not os.path.exists(os.path.join(arch, "config.json")):
      decoder_transfer.write_architecture(arch, corpus)
    pretrain_dir, hf_folder = os.path.join(work, "gpt_pretrain"), os.path.join(work, "gpt_pretrained_hf")
    train_process(f"configs/gpt_pretrain.py:arch={arch},text={corpus},steps={args.pretrain_steps}", pretrain_dir)
    if not os.path.exists(os.path.join(hf_folder, "model.safetensors")):
      from transfer import export
      export.export(pretrain_dir, hf_folder, "hf")
    for mode in ("lora", "full", "probe"):
      results = train_process(f"configs/gpt_sst2.py:init=pretrained,model={hf_folder},fraction=0.1,mode={mode},"
                              f"data={data}/sst2", os.path.join(work, f"gpt_sst2_{mode}"))
      rows.append(row("decoder", f"GPT-2 4x256 (pretrained {args.pretrain_steps} steps here), SST-2 10%", mode,
                      results, 32))
  if args.results and os.path.exists(args.results):   # the other parts' rows, as measured before
    with open(args.results) as f:
      kept = [r for r in json.load(f)["rows"] if r["part"] not in parts]
    order = ("text", "vision", "decoder")
    rows = sorted(kept + rows, key=lambda r: order.index(r["part"]))
  text = table(rows)
  print("\n" + text, flush=True)
  out = {"rows": rows, "wall_seconds": time.time() - t0, "table": text}
  for path in filter(None, (os.path.join(work, "lora_results.json"), args.results)):
    with open(path, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()

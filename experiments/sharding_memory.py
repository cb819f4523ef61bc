"""Per-device memory of full fine-tuning on 8 devices, from the compiler: the plan on paper for one TPU v5e-8 host
(16 GiB of HBM per chip) or a host with 8 GPUs.

  python experiments/sharding_memory.py --out experiments/results/sharding_memory_DATE.json

Each row is ``transfer.plan`` (the trainer's own train step: AdamW, the default rules, float32, compiled for the
mesh on abstract values, nothing allocated) on 8 simulated CPU devices, in a process of its own (this script sets
``XLA_FLAGS``). Models, shapes only (random init; no weights are read):

- BERT-base (12 x 768, 110M), sequence classification, batch 64 x 512 tokens;
- ViT-B/16 (86M) at 224 px, image classification, batch 64;
- GPT-2-medium-shaped (24 x 1024, 355M), causal LM, batch 32 x 1024 tokens;
- a 1B Llama-shaped decoder (Llama 3.2 1B's shapes: 16 x 2048, GQA 32/8 heads, SwiGLU 8192, 128k vocabulary,
  tied embeddings; 1.24B), causal LM, batch 32 x 1024 tokens.

Layouts: replicated (data=8: every device holds the whole state), FSDP-8 (data=1, fsdp=8: parameters and
optimizer state split eight ways, gathered layer by layer) and FSDP-8 with ``model.remat='block'``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHITECTURES = {   # transformers config class and its arguments: the shapes of each model (config.json only)
    "bert-base": ("BertConfig", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=512)),
    "gpt2-medium": ("GPT2Config", dict(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024)),
    "llama-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)),
}
MODELS = {   # name -> (config.model.name, architecture, task, batch, tokens)
    "BERT-base": ("bert", "bert-base", "classification", 64, 512),
    "ViT-B/16": ("vit-b16", None, "classification", 64, None),
    "GPT-2-medium": ("gpt2", "gpt2-medium", "causal_lm", 32, 1024),
    "Llama-1B": ("llama", "llama-1b", "causal_lm", 32, 1024),
}
LAYOUTS = {"replicated": (dict(data=8, fsdp=1), "none"), "FSDP-8": (dict(data=1, fsdp=8), "none"),
           "FSDP-8 + remat": (dict(data=1, fsdp=8), "block")}

ROW_SCRIPT = """
import json, sys
from transfer import config_base, plan
name, architecture, task, batch, tokens, data, fsdp, remat = json.loads(sys.argv[1])
c = config_base.base()
c.model.name, c.model.architecture, c.model.remat, c.model.dropout = name, architecture, remat, 0.1
c.task, c.batch_size = task, batch
c.data.name = "lm_text" if task == "causal_lm" else c.data.name
if tokens:
  c.data.max_length = tokens
else:
  c.data.resolution = 224
c.mesh.data, c.mesh.fsdp = data, fsdp
c.optimizer.weight_decay = 0.01
print("PLAN " + json.dumps(plan.plan(c)))
"""


def architecture_folder(base: str, key: str) -> str:
  import transformers
  cls, kwargs = ARCHITECTURES[key]
  folder = os.path.join(base, key)
  getattr(transformers, cls)(**kwargs).save_pretrained(folder)
  return folder


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="JSON file for the rows")
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
  args = parser.parse_args()
  # LLVM at -O0: the figures come from XLA's buffer assignment and cost analysis of the optimised HLO, which LLVM
  # never sees; only the (unused) machine code is worse, and each compile is several times faster.
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
  rows = json.load(open(args.out)) if os.path.exists(args.out) else []
  done = {(r["label"], r["layout"]) for r in rows}
  with tempfile.TemporaryDirectory() as tmp:
    for label in args.models.split(","):
      name, arch, task, batch, tokens = MODELS[label]
      folder = architecture_folder(tmp, arch) if arch else None
      for layout, (mesh, remat) in LAYOUTS.items():
        if (label, layout) in done:
          continue
        print(f"{label} {layout} ...", flush=True)
        spec = json.dumps([name, folder, task, batch, tokens, mesh["data"], mesh["fsdp"], remat])
        out = subprocess.run([sys.executable, "-c", ROW_SCRIPT, spec], cwd=ROOT, env=env, capture_output=True,
                             text=True)
        if out.returncode:
          sys.exit(f"{label} {layout} failed:\n{out.stderr[-3000:]}")
        plan = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("PLAN "))[5:])
        rows.append({"label": label, "layout": layout, **plan})
        gib = lambda b: b / 2 ** 30
        print(f"  state {gib(plan['state_bytes']):.2f} GiB, temporaries {gib(plan['temporaries']):.2f} GiB, peak "
              f"{gib(plan['peak']):.2f} GiB per device", flush=True)
        with open(args.out, "w") as f:
          json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

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
optimizer state split eight ways, gathered layer by layer) and FSDP-8 with ``model.remat='block'``, with the
trainer's default dropout generator (``dropout_rng_impl='rbg'``); for the models with dropout in their blocks,
FSDP-8 + remat once more with 'threefry' (see ``LAYOUTS``).

  python experiments/sharding_memory.py --out FILE --table    # the README's table from the rows
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
LAYOUTS = {"replicated": (dict(data=8, fsdp=1), "none", "rbg"), "FSDP-8": (dict(data=1, fsdp=8), "none", "rbg"),
           "FSDP-8 + remat": (dict(data=1, fsdp=8), "block", "rbg"),
           # The trainer's default dropout generator, 'rbg', materialises its random bits (XLA's RngBitGenerator is
           # one op that nothing fuses into) and keeps them for the backward pass; 'threefry' is elementwise, so XLA
           # fuses it into each mask's consumer, forward and backward, and keeps nothing. The models with dropout:
           "FSDP-8 + remat, threefry": (dict(data=1, fsdp=8), "block", "threefry")}
# Not bfloat16: XLA's CPU backend computes bfloat16 programs in float32 (its float-normalisation pass), so their
# buffers, and this table, would be the float32 ones; on a TPU a bfloat16 step's activations are about half.
DROPOUT_MODELS = ("BERT-base", "GPT-2-medium")   # dropout inside their blocks (the ViT and Llama have none there)

ROW_SCRIPT = """
import json, sys
from transfer import config_base, plan
name, architecture, task, batch, tokens, data, fsdp, remat, rng, dtype = json.loads(sys.argv[1])
c = config_base.base()
c.model.name, c.model.architecture, c.model.remat, c.model.dropout = name, architecture, remat, 0.1
c.task, c.batch_size, c.total_steps = task, batch, 1000   # the step's shapes do not depend on the run's length
c.data.name = "lm_text" if task == "causal_lm" else c.data.name
if tokens:
  c.data.max_length = tokens
else:
  c.data.resolution = 224
c.mesh.data, c.mesh.fsdp = data, fsdp
c.dropout_rng_impl, c.model.dtype = rng, dtype
c.optimizer.weight_decay = 0.01
print("PLAN " + json.dumps(plan.plan(c)))
"""


# ----------------------------------------------------------------------------------------------------------------
# The plan for one TPU v5e-8 host, on paper. Chip figures from Google's v5e page (docs.cloud.google.com/tpu/docs/
# v5e); the rest are this script's assumptions, stated where the table is printed.
V5E_PEAK_FLOPS = 197e12          # bf16 per chip
V5E_HBM_BYTES = 16e9             # per chip
V5E_ICI_BYTES_PER_S = 400e9      # bidirectional, per chip
MATMUL_EFFICIENCY = 0.6          # assumed: the share of peak a well-shaped bf16 training step sustains on the MXUs
COLLECTIVE_SHARE_OF_ICI = 0.5    # assumed: a ring collective on the 2x4 torus moves data at half the ICI figure


def projected_v5e8(row: dict, model_flops: float) -> dict:
  """Step time and MFU of ``row``'s step on a v5e-8 host: compute time = the compiler's FLOPs per device over
  ``MATMUL_EFFICIENCY`` x peak; communication = the float32 bytes the layout moves per device (replicated:
  all-reduce of the gradients, 2 (n-1)/n x params; FSDP: two all-gathers of the weights and one reduce-scatter of
  the gradients, 3 (n-1)/n x params) over ``COLLECTIVE_SHARE_OF_ICI`` x ICI; the two overlap (XLA's async
  collectives on TPU), so the step takes the longer of them. MFU counts ``model_flops``, the step without
  rematerialisation's recomputed forward (the replicated row's FLOPs), so remat's extra work lowers it."""
  n = 8
  compute = row["flops"] / (V5E_PEAK_FLOPS * MATMUL_EFFICIENCY)
  moves = 3 if row["mesh"]["fsdp"] > 1 else 2
  comm = moves * (n - 1) / n * row["params"] * 4 / (V5E_ICI_BYTES_PER_S * COLLECTIVE_SHARE_OF_ICI)
  step = max(compute, comm)
  return {"compute_s": compute, "comm_s": comm, "step_s": step, "mfu": model_flops / (step * V5E_PEAK_FLOPS),
          "fits": row["peak"] <= V5E_HBM_BYTES}


def table(rows: list[dict]) -> str:
  """The README's table: per-device memory from the compiler, and the v5e-8 projection."""
  gib = lambda b: f"{b / 2 ** 30:.2f}"
  lines = ["| model | params | layout | state GiB | temporaries GiB | peak GiB | TFLOP / device / step | fits v5e "
           "(16 GB) | v5e-8 step s (compute / comm) | v5e-8 MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
  model_flops = {r["label"]: r["flops"] for r in rows if r["layout"] == "replicated"}
  order = lambda r: (list(MODELS).index(r["label"]), list(LAYOUTS).index(r["layout"]))
  for r in sorted(rows, key=order):
    p = projected_v5e8(r, model_flops.get(r["label"], r["flops"]))
    lines.append(f"| {r['label']} | {r['params'] / 1e6:.0f}M | {r['layout']} | {gib(r['state_bytes'])} | "
                 f"{gib(r['temporaries'])} | {gib(r['peak'])} | {r['flops'] / 1e12:.2f} | "
                 f"{'yes' if p['fits'] else 'no'} | {p['step_s']:.3f} ({p['compute_s']:.3f} / {p['comm_s']:.3f}) | "
                 f"{100 * p['mfu']:.0f}% |")
  return "\n".join(lines)


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
  parser.add_argument("--table", action="store_true", help="print the table of --out's rows and stop")
  args = parser.parse_args()
  if args.table:
    print(table(json.load(open(args.out))))
    return
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
      for layout, (mesh, remat, rng, *dtype) in LAYOUTS.items():
        if (label, layout) in done or (layout.endswith("threefry") and label not in DROPOUT_MODELS):
          continue
        print(f"{label} {layout} ...", flush=True)
        spec = json.dumps([name, folder, task, batch, tokens, mesh["data"], mesh["fsdp"], remat, rng,
                           (dtype or ["float32"])[0]])
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

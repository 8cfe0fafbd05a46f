"""`ModelConfig.scan_layers`: each pass runs its repeated groups of layers as `jax.lax.scan`s
(`sleep_lm.model.hybrid.layer_groups`), the parameters staying one subtree per layer.

The oracle is the plain layer loop (scan_layers=False, the program every other test checks) on
the same parameters, in float32, every leaf within relative RMS 1e-5: the sleep scan's loss,
logits, GDN states and gradients w.r.t. every parameter (each non-zero), the plain forward's
logits; one pass of each span of a looped range from random states and a retained prefix (h, the
states, the attention layers' own keys/values) and its gradients; every decode layout's forward;
streams (prefill, a sleep, greedy tokens identical, single-token logits, the decode state). The
configs: a retrofit in small ((A G) x 2, MLP-less GDN layers, tied head, remat "blocks"), the
SmolLM2-like pattern (A A A G) x 2 + A A at tiny width (grouped-query attention), a looped range
(1, 5) with sliding eviction and remat "full". What reads the parameter tree is checked
unchanged: the tree itself, the train state with Muon and `optimizer.train_layers` and its
labels (and one optimizer step, slow), the importer's parameters with inserted GDN layers
against the NumPy oracle.

Program size (a check that can fail): the loss-and-gradient program of the 16-layer pattern
(A G) x 8 (one window, N = 1) lowers to < 0.4x the plain loop's StableHLO; measured here (test
flags, a loaded 2-core CPU): 1,881,821 -> 627,829 characters (0.33x), traced and lowered in
7.5 s -> 1.7 s. The training step at N = 2 with compile times (CPU, default XLA flags):
`measure()`, the slow test, and docs/performance.md, "Layer-group scan (compile time)".
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.common.validation import FieldError
from sleep_lm.inference.stream import Stream
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import (
  HybridLM,
  LayerGroup,
  convert_params,
  init_params,
  layer_groups,
  loop_segments,
  pass_caches,
  window_pass,
  zero_states,
)
from sleep_lm.model.layers import LAYOUTS, AttentionCache
from sleep_lm.model.sleep import sleep_forward
from sleep_lm.model.windows import window_context
from sleep_lm.training.step import (
  OptimizerConfig,
  TrainState,
  create_train_state,
  make_optimizer,
  masked_loss_and_metrics,
  param_labels,
  train_step,
)
from tests.numerics import rel_rms
from tests.test_model_features import make_params

L = 6          # window
T = 2 * L      # 2 windows: (sleep, wake)
TOL = 1e-5


def kinds(pattern: str) -> tuple[str, ...]:
  return tuple("attn" if c == "A" else "gdn" for c in pattern)


SMOL = kinds("AAAG" * 2 + "AA")
CASES = {
    # A retrofit in small: (A G) x 2, the GDN layers without an MLP (as `sleep_lm.model.retrofit`
    # inserts them), tied head; remat "blocks": every layer checkpointed on its own, in the
    # scan's body too.
    "retrofit_4": dict(layers=kinds("AG" * 2), mlp_layers=(True, False) * 2,
                       tie_embeddings=True, remat="blocks"),
    # SmolLM2 + inserted GDN layers at tiny width: (A A A G) x 2 + A A, no MLP on the GDN
    # layers, tied head, 2 query heads on 1 key/value head.
    "smollm2_like": dict(layers=SMOL, mlp_layers=tuple(k == "attn" for k in SMOL),
                         tie_embeddings=True, attn_kv_heads=1),
    # Looped range (1, 5) of (A G) x 3: prelude A, range (G A) x 2, coda G; sliding eviction,
    # each pass under remat "full" (`sleep._remat`, around the layer scan).
    "loop_sliding": dict(layers=kinds("AG" * 3), loop_layers=(1, 5), eviction="sliding",
                         remat="full"),
}
# The scans of each case's passes (`run_pass` per span of `loop_segments`): their lengths.
SCANS = {"retrofit_4": [[2]], "smollm2_like": [[2]], "loop_sliding": [[], [2], []]}
# Compiling the larger cases' gradients (or streams) twice takes 30-60 s on a loaded 2-core CPU.
SLOW = pytest.mark.slow


def config(scan: bool = False, **overrides) -> ModelConfig:
  base = dict(vocab_size=7, d_model=32, layers=kinds("AG" * 2), attn_head_dim=16,
              gdn_head_dim=16, mlp_dim=48, window=L, passes=2, scan_layers=scan)
  return ModelConfig(**{**base, **overrides})


def both(case: str) -> tuple[ModelConfig, ModelConfig]:
  """(plain loop, scan) configs of a case."""
  return config(False, **CASES[case]), config(True, **CASES[case])


def assert_close(got, want, what: str, tol: float = TOL) -> None:
  """Every leaf of two pytrees within relative RMS `tol`, leaf by leaf."""
  paths = jax.tree_util.tree_leaves_with_path(want)
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True):
    err = rel_rms(g, w)
    assert err < tol, f"{what}{jax.tree_util.keystr(path)}: relative RMS error {err:.2e}"


def data(seed: int = 0, batch: int = 2, t: int = T):
  """Tokens, targets and a loss mask supervising the last 2 tokens (T = 2L: (sleep, wake))."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 7, (batch, t)), jnp.int32)
  mask = np.zeros((batch, t), np.float32)
  mask[:, t - 2:] = 1.0
  return tokens, jnp.roll(tokens, -1, axis=1), jnp.asarray(mask)


# ------------------------------------------------------------------- the group decomposition


def groups(pattern: str) -> list[tuple[int, int, int]]:
  return [tuple(g) for g in layer_groups(pattern)]


def test_layer_groups_on_hand_written_patterns():
  # SmolLM2 + 4 GDN layers: 4 x (A*7 G), then the last two attention layers on their own.
  assert groups("AAAAAAAG" * 4 + "AA") == [(0, 8, 4), (32, 1, 1), (33, 1, 1)]
  assert groups("AG" * 8) == [(0, 2, 8)]                   # the 16-layer model: 8 x (A G)
  assert groups("A" * 30) == [(0, 1, 30)]                  # the reference: 30 x A
  assert groups("AAAG" * 2 + "AA") == [(0, 4, 2), (8, 1, 1), (9, 1, 1)]
  assert groups("AGAG") == [(0, 2, 2)]                     # 2 x (A G): 3 bodies against 4
  assert groups("AA") == [(0, 1, 1), (1, 1, 1)]            # 2 x A saves nothing: in line
  assert groups("AAA") == [(0, 1, 3)]
  assert groups("AGA") == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]
  assert groups("") == []
  # Runs of different groups, one after the other; a run anywhere in the stack.
  assert groups("GA" * 5 + "AAA") == [(0, 2, 5), (10, 1, 3)]
  assert groups("GG" + "AG" * 4) == [(0, 1, 1), (1, 2, 4), (9, 1, 1)]
  assert groups("ABCABCABD") == [(0, 3, 2), (6, 1, 1), (7, 1, 1), (8, 1, 1)]
  # Any hashable signatures; the groups are exact repetitions, position by position.
  sigs = [("attn", True), ("gdn", False)] * 3 + [("attn", True), ("gdn", True)]
  assert groups(sigs) == [(0, 2, 3), (6, 1, 1), (7, 1, 1)]
  assert LayerGroup(4, 2, 3).stop == 10
  for pattern in ("AAAAAAAG" * 4 + "AA", "GAGAAGAGAGGGA", "ABABABCABCABC", "AAB" * 5 + "A"):
    covered = [i for g in layer_groups(pattern) for i in range(g.start, g.stop)]
    assert covered == list(range(len(pattern))), pattern      # every layer once, in order
    for g in layer_groups(pattern):
      unit = pattern[g.start:g.start + g.period]
      assert pattern[g.start:g.stop] == unit * g.repeats


def test_scan_layers_is_validated_by_name():
  with pytest.raises(FieldError, match=r"ModelConfig\.scan_layers.*True or False"):
    config(scan=1)
  assert not ModelConfig(vocab_size=5).scan_layers


def scan_lengths(cfg: ModelConfig, params, span) -> list[int]:
  """The lengths of the layer scans in one `run_pass` over `span`: the scans at its jaxpr's top
  level whose carry is h [B,L,D] (not a GDN op's scan over chunks)."""
  caches = pass_caches(cfg, zero_states(cfg, 1))
  ctx = window_context(jnp.asarray(0), L)
  fn = lambda p, h: HybridLM(cfg).apply({"params": p}, h, caches, ctx, span=span,
                                        method=HybridLM.run_pass)
  jaxpr = jax.make_jaxpr(fn)(params, jnp.zeros((1, L, cfg.d_model)))
  return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"
          and e.outvars[0].aval.shape == (1, L, cfg.d_model)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_tree_unchanged_and_groups_scanned(case):
  """The same parameters (names, shapes, dtypes: what checkpoints and `init_from` hold), the same
  train state with Muon and `optimizer.train_layers` (the GDN layers), the same labels; and the
  passes really scan."""
  plain, scan = both(case)
  gdn = tuple(i for i, k in enumerate(plain.layers) if k == "gdn")
  optimizer = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0, train_layers=gdn))

  def shapes(cfg):
    state = jax.eval_shape(lambda: create_train_state(cfg, optimizer, jax.random.key(0)))
    return jax.tree.map(lambda x: (x.shape, x.dtype), state), param_labels(state.params, gdn)
  assert shapes(scan) == shapes(plain)
  params = make_params(plain)
  spans = list(loop_segments(plain)) if plain.partial_loop else [None]
  assert [scan_lengths(scan, params, s) for s in spans] == SCANS[case]
  assert all(scan_lengths(plain, params, s) == [] for s in spans)


# ----------------------------------------------------------------------- the same function


def outputs(cfg: ModelConfig, schedule=None):
  """Jitted (params, tokens, targets, mask) -> (loss, sleep logits, GDN states, gradients,
  plain forward logits)."""
  def fn(params, tokens, targets, mask):
    def loss(p):
      out = sleep_forward(cfg, p, tokens, mask, schedule=schedule)
      return masked_loss_and_metrics(out.logits, targets, mask)[0], out
    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    plain = HybridLM(cfg).apply({"params": params}, tokens)
    return value, out.logits, out.states, grads, plain
  return jax.jit(fn)


@pytest.mark.parametrize("case, t, schedule", [
    pytest.param("retrofit_4", L, (True,), marks=SLOW),   # one window, 2 passes, supervised
    pytest.param("smollm2_like", T, None, marks=SLOW),               # traced (conds)
    pytest.param("loop_sliding", T, (True, False), marks=SLOW)])     # static
def test_sleep_loss_gradients_and_forward_equal_the_plain_loop(case, t, schedule):
  plain, scan = both(case)
  params = make_params(plain, seed=1)
  batch = data(1, t=t)
  want = outputs(plain, schedule)(params, *batch)
  got = outputs(scan, schedule)(params, *batch)
  for name, g, w in zip(("loss", "sleep logits", "GDN states", "gradient", "plain logits"),
                        got, want, strict=True):
    assert_close(g, w, name)
  zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(got[3])
          if not np.any(np.asarray(g))]
  assert not zero, f"no gradient reaches {zero}"


def test_window_pass_and_its_gradients_equal_the_plain_loop():
  """One pass of each span of the looped range ((1, 5) of (A G) x 3, remat "blocks") over a
  window, from random GDN states and a random retained prefix (sliding): h, the states, every
  attention layer's own keys/values, and the gradients of all of them (a random projection)
  w.r.t. every parameter, h, the states and the prefix."""
  plain, scan = (dataclasses.replace(c, remat="blocks") for c in both("loop_sliding"))
  params = make_params(plain, seed=2)
  rng = np.random.default_rng(3)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  h = normal(2, L, 32)
  states = tuple(0.1 * normal(2, 2, 16, 16) for _ in range(plain.num_gdn_layers))
  kv = (2, L - 1, plain.num_kv_heads, 16)
  prefix = tuple(AttentionCache(normal(*kv), normal(*kv)) for _ in range(plain.num_attn_layers))
  ctx = window_context(jnp.asarray(L), L, retained=L - 1, sliding=True)

  def passes(cfg):
    def fn(params, h, states, prefix):
      out = []
      for span in loop_segments(cfg):
        h, states, own = window_pass(cfg, params, ctx, prefix, h, states, span=span)
        out.append((h, states, own))
      return out
    return fn
  weights = jax.tree.map(lambda x: normal(*x.shape),
                         jax.eval_shape(passes(plain), params, h, states, prefix))

  def run(cfg):
    def loss(*args):
      return sum(jnp.vdot(w, x) for w, x in zip(jax.tree.leaves(weights),
                                                jax.tree.leaves(passes(cfg)(*args)), strict=True))
    fn = lambda *args: (passes(cfg)(*args), jax.grad(loss, argnums=(0, 1, 2, 3))(*args))
    return jax.jit(fn)(params, h, states, prefix)
  (want, want_grads), (got, got_grads) = run(plain), run(scan)
  assert_close(got, want, "window_pass")
  assert_close(got_grads, want_grads, "gradient")
  layers = {k: v for k, v in got_grads[0].items() if k.startswith("layer_")}   # no embedding
  zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(layers)
          if not np.any(np.asarray(g))]
  assert not zero, f"no gradient reaches {zero}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_decode_layout_computes_the_training_forward(layout):
  """The layouts' parameters (fused, transposed: other keys per layer) stacked as they are."""
  plain, scan = both("smollm2_like")
  params = make_params(plain, seed=4)
  tokens = data(4)[0][:, :9]
  want = jax.jit(HybridLM(plain).apply)({"params": params}, tokens)
  converted = convert_params(scan, params, LAYOUTS[layout])
  got = jax.jit(HybridLM(scan, LAYOUTS[layout]).apply)({"params": converted}, tokens)
  assert rel_rms(got, want) < TOL, layout


def decode(cfg: ModelConfig, params, tokens):
  """A stream: prefill of a window (2 passes), 8 greedy tokens (crossing a window boundary: a
  sleep), 2 more tokens fed one by one. (prompt logits, greedy tokens, the last logits, the
  final decode state)."""
  stream = Stream(cfg, params, tokens.shape[0])
  prompt = stream.feed(tokens[:, :L])
  generated = stream.generate(8, prompt[:, -1])
  last = [stream.feed(tokens[:, i:i + 1]) for i in (0, 1)]
  return prompt, generated, jnp.concatenate(last, axis=1), stream.state


@pytest.mark.parametrize("case", ["smollm2_like", pytest.param("retrofit_4", marks=SLOW),
                                  pytest.param("loop_sliding", marks=SLOW)])
def test_decoding_equals_the_plain_loop(case):
  plain, scan = both(case)
  params = make_params(plain, seed=5)
  tokens = data(5)[0]
  want, got = decode(plain, params, tokens), decode(scan, params, tokens)
  np.testing.assert_array_equal(got[1], want[1])
  for name, g, w in zip(("prompt logits", "last logits", "decode state"),
                        (got[0], got[2], got[3]), (want[0], want[2], want[3]), strict=True):
    assert_close(g, w, name)


# -------------------------------------------- what reads the parameter tree: unchanged by it


@SLOW
def test_train_step_with_muon_labels_and_train_layers_equals_the_plain_loop():
  """Stage 1 of the retrofit: only the GDN layers train (`optimizer.train_layers`), Muon on
  their matrices. One step: the same new parameters; the frozen ones exactly unchanged; the
  same labels and optimizer state tree."""
  plain, scan = both("retrofit_4")
  gdn = tuple(i for i, k in enumerate(plain.layers) if k == "gdn")
  optimizer = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0, train_layers=gdn))
  tokens, targets, mask = data(6, t=L)
  batch = {"inputs": tokens, "targets": targets, "loss_mask": mask}
  params = make_params(plain, seed=6)

  def step(cfg):
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    return jax.jit(lambda s, b: train_step(s, b, model_cfg=cfg, optimizer=optimizer,
                                           schedule=(True,)))(state, batch)
  (want, want_m), (got, got_m) = step(plain), step(scan)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert param_labels(got.params, gdn) == param_labels(want.params, gdn)
  assert_close(got_m["loss"], want_m["loss"], "loss")
  assert_close(got.params, want.params, "params")
  labels = param_labels(params, gdn)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), got.params,
                       params)
  frozen = jax.tree.leaves(jax.tree.map(lambda m, lab: m and lab == "frozen", moved, labels))
  assert not any(frozen)
  trained = [m for m, lab in zip(jax.tree.leaves(moved), jax.tree.leaves(labels), strict=True)
             if lab != "frozen"]
  assert trained and all(trained)


def test_imported_pretrained_model_with_inserted_gdn_layers_computes_the_reference():
  """A random Llama-family checkpoint of 6 layers, imported (`sleep_lm.pretrained.importer`)
  and given GDN layers at 3 and 7 (`sleep_lm.model.retrofit`: zero output projections, the function
  unchanged): (A A A G) x 2, one scan, and the NumPy oracle's logits."""
  pytest.importorskip("gguf")
  from sleep_lm.model.retrofit import insert_gdn_layers
  from sleep_lm.pretrained import Architecture, Checkpoint, Reference, canonical_shapes
  from sleep_lm.pretrained.importer import import_params, model_config
  arch = Architecture(family="llama", vocab_size=50, d_model=32, layers=6, heads=4, kv_heads=2,
                      head_dim=8, mlp_dim=48, rope_base=10_000.0, norm_eps=1e-5,
                      tied_embeddings=True, qkv_bias=False, context_length=64)
  rng = np.random.default_rng(7)
  tensors = {}
  for name, shape in canonical_shapes(arch).items():
    t = rng.standard_normal(shape) * (1.0 if name == "embed" else 0.3)
    tensors[name] = (1 + t if name.endswith("norm") else t).astype(np.float32)
  ckpt = Checkpoint(arch, tensors, source="random")
  cfg = model_config(arch)
  cfg, params = insert_gdn_layers(cfg, import_params(ckpt, cfg), (3, 7), jax.random.key(0))
  cfg = dataclasses.replace(cfg, scan_layers=True)
  assert cfg.layers == kinds("AAAG" * 2)
  tokens = np.random.default_rng(8).integers(0, 50, 17)
  got = jax.jit(HybridLM(cfg).apply)({"params": params}, np.asarray(tokens, np.int32)[None])
  assert rel_rms(got[0], Reference(ckpt, np.float32).logits(tokens)) < TOL
  assert scan_lengths(cfg, params, None) == [2]


# ------------------------------------------------------------------------ the program's size


def sixteen_layers(scan: bool, passes: int = 1) -> ModelConfig:
  """The 16-layer model's pattern ((A G) x 8) at tiny width."""
  return config(scan, layers=kinds("AG" * 8), passes=passes)


def grad_program(cfg: ModelConfig, t: int, schedule):
  """(jitted gradient of the loss, its abstract arguments) of tokens [2, t]."""
  params = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))
  tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((2, t), jnp.float32)

  def loss(p, x, m):
    out = sleep_forward(cfg, p, x, m, schedule=schedule)
    return masked_loss_and_metrics(out.logits, x, m)[0]
  return jax.jit(jax.grad(loss)), (params, tokens, mask)


def lowered_grad(cfg: ModelConfig, t: int, schedule) -> tuple[str, float]:
  """(StableHLO text, seconds to trace and lower) of the loss and its gradient."""
  fn, args = grad_program(cfg, t, schedule)
  start = time.perf_counter()
  text = fn.lower(*args).as_text()
  return text, time.perf_counter() - start


def test_sixteen_layer_gradient_program_is_much_smaller():
  """One window, N = 1: the loss and its gradient (the part of a step the layers make)."""
  sizes = {}
  for scan in (False, True):
    text, seconds = lowered_grad(sixteen_layers(scan), L, (False,))
    sizes[scan] = (len(text), text.count("\n"), seconds)
    print(f"scan_layers={scan}: {len(text):,} characters, {text.count(chr(10)):,} lines of "
          f"StableHLO, traced and lowered in {seconds:.1f} s")
  chars, lines = sizes[True][0] / sizes[False][0], sizes[True][1] / sizes[False][1]
  print(f"ratio: {chars:.2f}x characters, {lines:.2f}x lines")
  assert chars < 0.4 and lines < 0.4, (chars, lines)


def measure(compile: bool = True, programs=("step", "grad"), scans=(False, True),
            batched_muon: bool = True) -> dict:
  """The 16-layer model ((A G) x 8 at tiny width, N = 2, two windows (sleep, wake), batch 2) with
  and without the scan: its training step (Muon and AdamW), the loss-and-gradient program alone
  and the optimizer update alone ("update": `optimizer.update` on the step's gradients, state and
  parameters; the scan does not change it). StableHLO characters, seconds to trace and lower,
  seconds to compile (XLA's CPU backend) and lines of optimized HLO. `batched_muon=False`: Muon
  is `optax.contrib.muon` (one Newton-Schulz chain per matrix; `make_optimizer`). Prints one line
  each; returns {(program, scan_layers): numbers}."""
  optimizer = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=0),
                             batched_muon=batched_muon)
  batch = {k: jax.ShapeDtypeStruct((2, 2 * L), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("inputs", "targets", "loss_mask")}
  out = {}
  for program in programs:
    for scan in scans:
      cfg = sixteen_layers(scan, passes=2)
      if program in ("step", "update"):
        state = jax.eval_shape(lambda cfg=cfg: create_train_state(cfg, optimizer,
                                                                  jax.random.key(0)))
      if program == "step":
        fn = jax.jit(lambda s, b, cfg=cfg: train_step(s, b, model_cfg=cfg, optimizer=optimizer,
                                                      schedule=(True, False)))
        args = (state, batch)
      elif program == "update":
        fn = jax.jit(optimizer.update)
        args = (state.params, state.opt_state, state.params)
      else:
        fn, args = grad_program(cfg, 2 * L, (True, False))
      start = time.perf_counter()
      lowered = fn.lower(*args)
      lower_s = time.perf_counter() - start
      compile_s = hlo_lines = None
      if compile:
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        hlo_lines = compiled.as_text().count("\n")
      out[program, scan] = dict(chars=len(lowered.as_text()), lower_s=lower_s,
                                compile_s=compile_s, hlo_lines=hlo_lines)
      print(f"{program} scan_layers={scan} batched_muon={batched_muon}: "
            f"{out[program, scan]['chars']:,} characters of StableHLO, traced and lowered in "
            f"{lower_s:.1f} s" + (f", compiled in {compile_s:.1f} s to {hlo_lines:,} lines of "
                                  f"optimized HLO" if compile else ""), flush=True)
  return out


@pytest.mark.slow
def test_sixteen_layer_training_step_compiles_smaller():
  """The whole step, N = 2 (its optimizer works per parameter, unchanged by the scan: a large
  share of what is left), and its loss and gradient."""
  out = measure()
  assert out["step", True]["chars"] < 0.6 * out["step", False]["chars"], out
  assert out["grad", True]["chars"] < 0.4 * out["grad", False]["chars"], out

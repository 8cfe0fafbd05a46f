"""Tests for GSM-Infinite symbolic: an independent solver on the rendered text, an independent
reader of the tokens, layout, lengths, purity, disjointness, laws, floors, the task interface."""

from __future__ import annotations

import pickle
import re
from collections import Counter

import numpy as np
import pytest

from experiments import gsm_symbolic as gsm_config
from sleep_lm.model.sleep import static_schedule
from sleep_lm.tasks import eval_sets, make_task
from sleep_lm.tasks import gsm_symbolic as gsm
from sleep_lm.tasks.gsm_symbolic import GsmSymbolicTask
from sleep_lm.training import evaluation
from sleep_lm.training.run_config import RunConfig

# The token format, spelled out here rather than imported, so the readers below are independent.
PAD, ASSIGN, EQ, PLUS, MINUS, DOT, QUESTION, ANSWER, END = range(9)
INT0 = 9 + 39                      # token of the integer 0 (integers -39..49 from id 9)
HI, LO = 98, 1098                  # a name V<d>: HI + d // 1000, LO + d % 1000

STATEMENT = re.compile(r"assign (V\d{6}) = (V\d{6}|\d+)(?: ([+-]) 1)?\.")
QUESTION_RE = re.compile(r"^Question: which of the variables whose values can be derived are "
                         r"equal to (-?\d+)\?$")


def solve_text(text: str, question_first: bool = True):
  """Parses one rendered example with regular expressions and solves it by fixpoint.

  Returns (q, statements [(lhs, rhs or int, step)], the answer as written, the values of the
  derivable variables)."""
  lines = text.split("\n")
  assert len(lines) == 3
  question_line, context = (lines[0], lines[1]) if question_first else (lines[1], lines[0])
  q = int(QUESTION_RE.match(question_line).group(1))
  assert lines[2].startswith("Answer: ")
  written = lines[2][len("Answer: "):].split(", ")
  statements = [(m.group(1), m.group(2) if m.group(2).startswith("V") else int(m.group(2)),
                 {None: 0, "+": 1, "-": -1}[m.group(3)]) for m in STATEMENT.finditer(context)]
  # The regex consumed the whole context: nothing else is in it.
  assert " ".join(m.group(0) for m in STATEMENT.finditer(context)) == context
  values: dict[str, int] = {}
  changed = True
  while changed:                               # fixpoint: assign what can be assigned
    changed = False
    for lhs, rhs, step in statements:
      if lhs in values:
        continue
      if isinstance(rhs, int):
        values[lhs] = rhs
      elif rhs in values:
        values[lhs] = values[rhs] + step
      else:
        continue
      changed = True
  return q, statements, written, values


def read_tokens(tokens, max_len: int):
  """Reads one example's tokens into (statement strings in order, q, answer names, problem
  start, problem end) without the module's decoder."""
  tok = [int(t) for t in tokens]
  name = lambda p: (f"V{(tok[p] - HI) * 1000 + tok[p + 1] - LO:06d}"
                    if HI <= tok[p] < LO and LO <= tok[p + 1] < LO + 1000 else None)
  body = [p for p in range(max_len) if tok[p] != PAD]
  start, end = body[0], body[-1] + 1
  assert end - start == len(body), "PAD inside the problem"
  statements, q, p = [], None, start
  while p < end:
    if tok[p] == QUESTION:
      q, p = tok[p + 1] - INT0, p + 2
      continue
    assert tok[p] == ASSIGN and tok[p + 3] == EQ, f"bad statement at {p}"
    lhs = name(p + 1)
    assert lhs is not None
    if tok[p + 4] < HI:
      assert tok[p + 5] == DOT
      statements.append(f"assign {lhs} = {tok[p + 4] - INT0}.")
      p += 6
    elif tok[p + 6] == DOT:
      statements.append(f"assign {lhs} = {name(p + 4)}.")
      p += 7
    else:
      assert tok[p + 6] in (PLUS, MINUS) and tok[p + 7] == INT0 + 1 and tok[p + 8] == DOT
      statements.append(f"assign {lhs} = {name(p + 4)} {'+' if tok[p + 6] == PLUS else '-'} 1.")
      p += 9
  assert p == end
  assert tok[max_len] == ANSWER
  answer, p = [], max_len + 1
  while tok[p] != END:
    answer.append(name(p))
    p += 2
  assert all(t == PAD for t in tok[p + 1:])
  return statements, q, answer, start, end


CONFIGS = [
    GsmSymbolicTask(seed=3),
    GsmSymbolicTask(seed=4, split="eval", op=8),
    GsmSymbolicTask(seed=5, split="eval", op=2, question_first=False, padding="middle"),
    GsmSymbolicTask(seed=6, **gsm.PRESETS["smoke"]),
    GsmSymbolicTask(seed=7, op=40, min_len=400, max_len=700, max_op=40),
]


@pytest.mark.parametrize("task", CONFIGS, ids=lambda t: f"{t.split}_op{t.op}_{t.padding}")
def test_independent_solver_on_text_and_tokens(task):
  n = 120
  problems = task.problems(np.arange(n))
  batch = task.batch(np.arange(n))
  for i, problem in enumerate(problems):
    text = gsm.render_text(problem, question_first=task.question_first)
    q, statements, written, values = solve_text(text, task.question_first)
    # The stored answer is the set of derivable variables equal to q, in increasing order.
    expected = sorted(v for v, x in values.items() if x == q)
    assert written == expected, f"example {i}: {written} != {expected}"
    assert expected, "the answer is never empty"
    # Core: op derivable variables, one of them assigned a constant in 0..10.
    assert len(values) == problem.op == batch["op"][i]
    constants = [s for s in statements if isinstance(s[1], int)]
    assert len(constants) == 1 and 0 <= constants[0][1] <= 10
    # Each variable is assigned once; every underivable variable descends from the one
    # variable that is used but never assigned (the distractor root).
    lhs = [s[0] for s in statements]
    assert len(set(lhs)) == len(lhs)
    unassigned = {s[1] for s in statements if isinstance(s[1], str)} - set(lhs)
    distractors = set(lhs) - set(values)
    assert len(unassigned) == (1 if distractors else 0)
    # No distractor statement references a core variable: the forests are separate.
    assert not any(s[0] in distractors and s[1] in values for s in statements)
    # The tokens show the same problem as the text.
    tok_statements, tok_q, tok_answer, start, end = read_tokens(batch["inputs"][i], task.max_len)
    context = text.split("\n")[1 if task.question_first else 0]
    assert " ".join(tok_statements) == context
    assert tok_q == q and tok_answer == written
    assert end - start == batch["length"][i]
    assert task.min_len <= batch["length"][i] <= task.max_len
    if task.padding == "left":
      assert end == task.max_len
    else:
      assert start == 0
    first_token = batch["inputs"][i][start]
    assert (first_token == QUESTION) == task.question_first
    # Supervision: the ANSWER position and every answer token, predicting the next token.
    k = len(written)
    mask = batch["loss_mask"][i]
    sup = np.flatnonzero(mask)
    assert sup.tolist() == list(range(task.max_len, task.max_len + 2 * k + 1))
    assert (batch["targets"][i][sup] == batch["inputs"][i][sup + 1]).all()
    assert batch["targets"][i][sup[-1]] == END
    assert (batch["targets"][i][mask == 0] == 0).all()
    assert (batch["answer_group"][i] == np.where(mask > 0, 0, -1)).all()
    assert gsm.decode(batch["inputs"][i], task.max_len) == problem


def test_render_orders_and_decode():
  problem = gsm.Problem(4, (gsm.Statement(12, None, 3), gsm.Statement(345678, 12, 1),
                            gsm.Statement(7, 99, 0), gsm.Statement(8, 99, -1)), (345678,), 2)
  text = gsm.render_text(problem)
  assert text == ("Question: which of the variables whose values can be derived are equal to 4?\n"
                  "assign V000012 = 3. assign V345678 = V000012 + 1. assign V000007 = V000099. "
                  "assign V000008 = V000099 - 1.\nAnswer: V345678")
  last = gsm.render_text(problem, question_first=False).split("\n")
  assert last[0].startswith("assign") and last[1].startswith("Question") and last[2] == (
      "Answer: V345678")
  assert text == gsm.render_prompt(problem) + gsm.render_answer(problem)
  assert gsm.solve(problem) == {12: 3, 345678: 4}


def test_deterministic_batch_independent_and_distinct():
  task = GsmSymbolicTask(seed=11)
  idx = np.array([5, 0, 17, 3], np.uint64)
  a, b = task.batch(idx), task.batch(idx)
  for k in a:
    assert (a[k] == b[k]).all()
  # Example i does not depend on which other examples share its batch.
  for j, i in enumerate(idx):
    one = task.example(int(i))
    for k in a:
      assert (one[k] == a[k][j]).all(), k
  big = task.batch(np.arange(40))
  for k in a:
    assert (big[k][[5, 0, 17, 3]] == a[k]).all()
  assert pickle.loads(pickle.dumps(task)) == task
  other = GsmSymbolicTask(seed=12).batch(idx)
  assert not (other["inputs"] == a["inputs"]).all(axis=1).any()
  assert len({row.tobytes() for row in big["inputs"]}) == 40


@pytest.mark.parametrize("preset", list(gsm.PRESETS))
def test_lengths_per_preset(preset):
  fields = gsm.PRESETS[preset]
  n = {"long32k": 4, "long64k": 3}.get(preset, 64)
  for split, op in (("train", None), ("eval", fields["max_op"])):
    task = GsmSymbolicTask(split=split, op=op, **fields)
    batch = task.batch(np.arange(n))
    assert batch["inputs"].shape == (n, fields["max_len"] + 2 * fields["max_op"] + 2)
    nonpad = (batch["inputs"][:, :fields["max_len"]] != PAD).sum(1)
    assert (nonpad == batch["length"]).all()
    assert (batch["length"] >= fields["min_len"]).all()
    assert (batch["length"] <= fields["max_len"]).all()
    # The fill stops within one statement of a target drawn in [min_len + 8, max_len].
    spread = fields["max_len"] - fields["min_len"]
    assert n < 10 or batch["length"].max() > fields["max_len"] - 0.25 * spread
  # Statements per token: ours ~8.3 tokens per distractor statement.
  task = GsmSymbolicTask(**fields)
  b = task.batch(np.arange(n))
  per = (b["length"] - 2) / b["n_statements"]
  assert 7.5 < per.mean() < 9.0


def test_long_generation_is_fast():
  import time
  task = GsmSymbolicTask(**gsm.PRESETS["long64k"])
  t0 = time.perf_counter()
  batch = task.batch(np.arange(8))
  assert time.perf_counter() - t0 < 8.0           # ~0.2 s unloaded
  assert batch["n_statements"].min() > 5000


def _splitmix64(z: int) -> int:
  m = (1 << 64) - 1
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & m
  z = (z ^ (z >> 27)) * 0x94D049BB133111EB & m
  return z ^ (z >> 31)


def test_train_eval_disjoint_by_name_pools():
  """Every name of a train problem is in pool 0, of an eval problem in pool 1 (the parity of
  splitmix64(d XOR key), recomputed here in pure Python), so the streams share no variable."""
  key = 0x9001_5EED_0000_95A1
  pools = {}
  for split, parity in (("train", 0), ("eval", 1)):
    names = set()
    for op in (None, 2, 8):
      if split == "train" and op is not None:
        continue
      for p in GsmSymbolicTask(seed=0, split=split, op=op).problems(np.arange(60)):
        for s in p.statements:
          names.add(s.lhs)
          if s.rhs is not None:
            names.add(s.rhs)
    assert all(_splitmix64(d ^ key) & 1 == parity for d in names)
    assert all(0 <= d < 10**6 for d in names)
    pools[split] = names
  assert not pools["train"] & pools["eval"]
  # Both pools cover the HI and LO tokens broadly (half of each prefix's names).
  for names in pools.values():
    assert len({d // 1000 for d in names}) > 900 and len({d % 1000 for d in names}) > 900


def test_op_law_and_core_laws():
  task = GsmSymbolicTask(seed=1)
  batch = task.batch(np.arange(4000))
  counts = np.bincount(batch["op"], minlength=9)[1:]
  assert counts.sum() == 4000 and (np.abs(counts - 500) < 90).all()     # uniform in 1..8
  # Eval sets fix op; answers never empty; at op 2 the child equals the root 1/3 of the time.
  two = GsmSymbolicTask(seed=1, split="eval", op=2).batch(np.arange(3000))
  assert (two["op"] == 2).all() and (two["answer_size"] >= 1).all()
  assert abs((two["answer_size"] == 2).mean() - 1 / 3) < 0.03
  # The root's constant is uniform in 0..10 and q is a core value.
  problems = GsmSymbolicTask(seed=2, split="eval", op=1, **gsm.PRESETS["smoke"]).problems(
      np.arange(2200))
  consts = Counter(p.statements[[s.rhs for s in p.statements].index(None)].operand
                   for p in problems)
  assert sorted(consts) == list(range(11)) and min(consts.values()) > 140
  assert all(p.question == p.statements[[s.rhs for s in p.statements].index(None)].operand
             for p in problems)
  # A random recursive tree: node i's parent is uniform among the i earlier nodes, so the root
  # has on average H(op-1) = 1 + 1/2 + ... children; at op 8, 2.59.
  eight = GsmSymbolicTask(seed=3, split="eval", op=8, min_len=80, max_len=100).problems(
      np.arange(1500))
  root_children = [sum(s.rhs == next(t.lhs for t in p.statements if t.rhs is None)
                       for s in p.statements) for p in eight]
  assert abs(np.mean(root_children) - sum(1 / i for i in range(1, 8))) < 0.12
  steps = Counter(s.operand for p in eight for s in p.statements if s.rhs is not None)
  assert max(steps.values()) / min(steps.values()) < 1.1                # 0, +1, -1 uniform


def test_structural_floors_and_chance():
  task = GsmSymbolicTask(seed=0, split="eval", op=2)
  batch = task.batch(np.arange(1500))
  f = gsm.structural_floors(batch["inputs"], task.max_len)
  # op 2: {root} when the child differs and q is the root's value (2/3 * 1/2); all when equal.
  assert abs(f["floor_root_only"] - 1 / 3) < 0.04 and abs(f["floor_all_derivable"] - 1 / 3) < 0.04
  assert f["floor_empty"] == 0.0 and f["floor_mode"] < 0.01
  one = GsmSymbolicTask(seed=0, split="eval", op=1).batch(np.arange(200))
  assert gsm.structural_floors(one["inputs"], task.max_len)["floor_root_only"] == 1.0
  interface = make_task({"name": "gsm_symbolic"})
  assert interface.chance("op2")["exact_accuracy"] == 1 / 3
  assert interface.chance("op8")["exact_accuracy"] == 1 / 255


def test_task_interface_and_static_layout():
  task = make_task({"name": "gsm_symbolic", **gsm.PRESETS["small"], "eval_ops": [2, 4]})
  assert task.seq_len == 640 and task.vocab_size == gsm.VOCAB_SIZE == 2098
  assert task.eval_set_names() == ("op2", "op4")
  assert re.fullmatch(r"[\w.-]+", task.eval_set_id("op2"))
  ex = task.train_examples(0, np.arange(256))
  assert ex["inputs"].max() < task.vocab_size and set(ex) == {"inputs", "targets", "loss_mask",
                                                                "answer_group"}
  ev = task.eval_examples("op4", np.arange(8))
  assert ev["inputs"].shape == (8, 640)
  # The layout mask covers every example's supervised positions, and every window of the
  # presets' configs sees the same schedule for any batch.
  layout = task.layout_mask()
  assert (ex["loss_mask"] <= layout).all()
  for arg in ("small", "small,sliding", "smoke", "smoke,sliding", "paper", "paper,sliding"):
    run = RunConfig.from_config(gsm_config.get_config(arg))
    batch = run.task.train_examples(0, np.arange(64))
    schedule = static_schedule(run.model, run.task.layout_mask())
    assert static_schedule(run.model, batch["loss_mask"]) == schedule
    assert schedule[-1] is False and all(schedule[:-1])


@pytest.mark.parametrize("values, field", [
    ({"min_len": 10}, "config.task.min_len"),
    ({"max_len": 450}, "config.task.max_len"),
    ({"max_op": 41}, "config.task.max_op"),
    ({"min_op": 9}, "config.task.min_op"),
    ({"eval_ops": [2, 9]}, "config.task.eval_ops"),
    ({"eval_ops": 2}, "config.task.eval_ops"),
    ({"padding": "right"}, "config.task.padding"),
    ({"question_first": "yes"}, "config.task.question_first"),
    ({"seed": -1}, "config.task.seed"),
])
def test_bad_task_fields_name_the_field(values, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    make_task({"name": "gsm_symbolic", **values})


def test_bad_window_and_warmup_configs():
  with pytest.raises(ValueError, match="config.model.window"):
    gsm_config.get_config("small,L=630")   # 622..639 in two
  with pytest.raises(ValueError, match="config.hard_warmup_steps"):
    RunConfig.from_config(gsm_config.get_config("small,warmup=10"))    # hard eviction
  with pytest.raises(ValueError, match="config.hard_warmup_steps"):
    RunConfig.from_config(gsm_config.get_config("small,sliding,warmup=5000"))


def test_eval_set_round_trip_and_floors(tmp_path):
  """The real TFDS array_record path: records equal the generator's, floors are measured."""
  task = make_task({"name": "gsm_symbolic", **gsm.PRESETS["smoke"], "eval_ops": [1, 2]})
  sets = evaluation.prepare_eval_sets(task, size=48, data_dir=tmp_path)
  assert [s.name for s in sets] == ["op1", "op2"]
  source = eval_sets.eval_source(task, "op2", size=48, data_dir=str(tmp_path))
  whole = next(eval_sets.eval_batches(source, 48))
  direct = task.eval_examples("op2", np.arange(48))
  for k in whole:
    assert (whole[k] == direct[k]).all()
  f = sets[1].floors
  assert f["chance_exact"] == 1 / 3 and f["floor_empty"] == 0.0
  assert f["floor_root_only"] == gsm.structural_floors(direct["inputs"], task.max_len)[
      "floor_root_only"]
  assert sets[0].floors["floor_root_only"] == 1.0
  text = evaluation.format_results(
      {"op2": {"loss": [1.0], "exact_accuracy": [0.5], "query_accuracy": [0.5],
               "answer_accuracy": [[0.5]], "examples": 48, **f}}, [0])
  assert "root_only" in text


def _tiny_run(tmp_path, **fields):
  config = gsm_config.get_config("smoke")
  config.task.eval_ops = (2,)
  config.model.update(d_model=32, attn_head_dim=16, gdn_head_dim=16, mlp_dim=32)
  config.optimizer.warmup_steps = 1
  config.update(batch_size=4, steps=4, log_every=1, eval_every=4, eval_size=16,
                eval_batch_size=16, checkpoint_every=4, tensorboard=False,
                data_dir=str(tmp_path / "data"))
  for key, value in fields.items():
    node, *path = key.split(".")
    if path:
      config[node][path[0]] = value
    else:
      config[node] = value
  return RunConfig.from_config(config)


@pytest.mark.slow   # ~35 s of CPU: two tiny runs through the whole trainer
def test_trainer_hard_warmup_then_sliding(tmp_path):
  """A sliding run with hard_warmup_steps = 2 trains its first 2 steps exactly as the hard run
  (same init, data and compiled step) and then differently; the task trains and evaluates
  through the real trainer and TFDS eval sets."""
  from sleep_lm.training import trainer, workdir

  def losses(name, **fields):
    lines = []
    results = trainer.train(_tiny_run(tmp_path, **fields), tmp_path / name, log=lines.append)
    records = workdir.read_records(tmp_path / name / "metrics.jsonl")
    return [r["loss"] for r in records if r["kind"] == "train"], results, lines

  hard, results, _ = losses("hard")
  warm, _, lines = losses("warm", **{"model.eviction": "sliding", "hard_warmup_steps": 2})
  assert len(hard) == len(warm) == 4
  np.testing.assert_allclose(warm[:2], hard[:2], rtol=1e-6)
  assert warm[2] != hard[2]
  assert any("warm-up over" in line for line in lines)
  r = results["op2"]
  assert 0 <= r["exact_accuracy"][0] <= 1 and "floor_root_only" in r


# ------------------------------------------------------------------------------ curriculum

def test_layout_fields_place_a_smaller_problem_as_the_larger_task_does():
  small = GsmSymbolicTask(seed=3, min_len=17, max_len=40, max_op=2)
  for padding in ("left", "middle"):
    placed = small.replace(layout_len=118, layout_op=4, padding=padding)
    own = small.replace(padding=padding).batch(np.arange(16))
    big = placed.batch(np.arange(16))
    assert placed.seq_len == 118 + 10 and big["inputs"].shape == (16, 128)
    for i in range(16):
      # Same problem and answer, read back from either layout.
      assert gsm.decode(big["inputs"][i], 118) == gsm.decode(own["inputs"][i], 40)
      # Supervision: ANSWER .. last name token, the answer region starting at layout_len.
      k = own["answer_size"][i]
      assert np.flatnonzero(big["loss_mask"][i]).tolist() == list(range(118, 119 + 2 * k))
      sup = big["loss_mask"][i] > 0
      assert (big["targets"][i][sup] == big["inputs"][i][np.flatnonzero(sup) + 1]).all()
    problem = big["inputs"][:, :118]
    if padding == "left":
      assert (problem[:, -1] == DOT).all()
    else:
      assert (problem[:, 0] == QUESTION).all()
  with pytest.raises(ValueError, match="layout_len"):
    small.replace(layout_len=39)
  with pytest.raises(ValueError, match="layout_op"):
    small.replace(layout_op=1)


def test_curriculum_stages_by_example_index():
  stages = ((64, 17, 40, 1), (128, 40, 80, 2))
  plain = make_task({"name": "gsm_symbolic", **gsm.PRESETS["smoke"], "eval_ops": [1, 2]})
  task = make_task({"name": "gsm_symbolic", **gsm.PRESETS["smoke"], "eval_ops": [1, 2],
                    "curriculum": [list(s) for s in stages]})          # lists, as from JSON
  assert task.curriculum == stages and task.seq_len == plain.seq_len
  idx = np.arange(32, 224)                  # crosses both boundaries, out of order below
  idx = np.concatenate([idx[100:], idx[:100]])
  batch = task.train_examples(5, idx)
  # Each example is the stage generator's (or, past the last stage, the plain task's) example.
  for j, i in enumerate(idx):
    row = gsm.decode(batch["inputs"][j], plain.max_len)
    if i < 64:
      ref = GsmSymbolicTask(seed=5, min_len=17, max_len=40, max_op=1)
    elif i < 128:
      ref = GsmSymbolicTask(seed=5, min_len=40, max_len=80, max_op=2)
    else:
      ref = plain._generator("train", seed=5)
    assert row == gsm.decode(ref.replace(layout_len=118, layout_op=4).example(int(i))["inputs"],
                             118)
    length = int((batch["inputs"][j, :118] != PAD).sum())
    assert ref.min_len <= length <= ref.max_len and row.op <= ref.max_op
  past = plain.train_examples(5, idx[idx >= 128])
  for k in past:
    assert (batch[k][idx >= 128] == past[k]).all()
  # The window schedule never changes, and eval sets ignore the curriculum.
  assert (batch["loss_mask"] <= task.layout_mask()).all()
  assert (task.layout_mask() == plain.layout_mask()).all()
  assert task.eval_set_id("op2") == plain.eval_set_id("op2")
  assert (task.eval_examples("op2", np.arange(4))["inputs"]
          == plain.eval_examples("op2", np.arange(4))["inputs"]).all()
  pickle.loads(pickle.dumps(task))


@pytest.mark.parametrize("stages, match", [
    ([[64, 17, 40]], r"config\.task\.curriculum\[0\]: must be \(until, "),
    ([[64, 17, 40, 2], [64, 40, 80, 2]], r"curriculum\[1\]\.until: must be an integer >= 65"),
    ([[64, 17, 200, 2]], r"curriculum\[0\]\.max_len: "),
    ([[64, 17, 40, 5]], r"curriculum\[0\]\.max_op: "),
    ([[64, 10, 40, 2]], r"curriculum\[0\]\.min_len: "),       # shorter than an op-2 core
    ("abc", "config.task.curriculum"),
])
def test_bad_curriculum_names_the_stage(stages, match):
  with pytest.raises(ValueError, match=match):
    make_task({"name": "gsm_symbolic", **gsm.PRESETS["smoke"], "eval_ops": [1],
               "curriculum": stages})


def test_config_recipe_and_curriculum_in_steps():
  c = gsm_config.get_config("smoke,steps=2000,ops=2")
  assert c.model.tie_embeddings and c.optimizer.adamw_lr == 3e-3
  assert c.task.curriculum == ((12800, 17, 40, 2), (19200, 40, 80, 2))   # 0.4, 0.6 of 2000 x 16
  assert c.task.eval_ops == (1, 2)                   # the smoke sets of op <= ops
  assert gsm_config.get_config("small,nocurriculum").task.curriculum == ()
  for sweep in ("fig4", "fig5", "pilot"):
    for arg in gsm_config.SWEEPS[sweep]:
      run = RunConfig.from_config(gsm_config.get_config(arg))
      assert run.task.curriculum and run.model.tie_embeddings
      last = run.task.curriculum[-1][0] // run.batch_size
      assert last < run.steps                       # the preset's own problems at the end


def test_attn_only_is_attention_only_at_every_size():
  # The smoke preset sets its own (attn, gdn) layers: attn_only must apply after it.
  for size in ("smoke", "small", "paper", "long8k"):
    c = gsm_config.get_config(f"{size},attn_only,eviction=none")
    assert set(c.model.layers) == {"attn"}, size
  assert gsm_config.get_config("smoke,attn_only").model.layers == ("attn", "attn")
  assert gsm_config.get_config("smoke").model.layers == ("attn", "gdn")

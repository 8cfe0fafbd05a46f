"""GSM-Infinite symbolic problems as text, in a pretrained model's own tokens (the fine-tuning
data of a converted checkpoint, `sleep_lm.pretrained.convert`; docs/tasks.md, docs/pretrained.md).

The problems are `sleep_lm.tasks.gsm_symbolic`'s (same generator, same name pools, so train and
eval stay disjoint), shown through its own render functions, in the paper's order: the question
first, the statements, the answer marker, then the answer with no chain of thought:

  Question: which of the variables whose values can be derived are equal to 4?
  assign V120384 = V009731 + 1. assign V009731 = 3. assign V884210 = V120384. ...
  Answer: V120384, V884210

and tokenized by the tokenizer a converted workdir holds (`config.task.tokenizer`: the workdir, or
a folder with tokenizer.json; read once per process, never downloaded).

Tokens. The prompt (`render_prompt`, question ... "Answer:") is encoded whole, with the special
tokens the tokenizer's post-processor adds (BOS where the checkpoint wants one). The answer
(`render_answer` + "\\n": " V120384, V884210\\n") is encoded on its own, without special tokens,
so its tokens are a function of the answer set alone: the names in increasing order, ", "
between them, and a newline that ends the list (so the set's size is part of the prediction).
Byte-level BPE decodes a token sequence to the text it encodes, so two sets have the same answer
tokens iff they render to the same text iff they are the same set: exact match of the answer
tokens IS exact set match (the scored metric). A model that wrote the same text through another
token split would be scored wrong; decoding is teacher-forced, so it never does.

Layout of one example, seq_len = max_len + answer_len (fixed per task; PAD = the tokenizer's pad
id, else its first eos id):
  positions 0 .. max_len-1        PAD ... PAD prompt (left padding: every prompt ends at max_len-1)
  positions max_len .. seq_len-1  the answer tokens, then PAD
`targets[p] = inputs[p + 1]` and `loss_mask` 1 for p = max_len-1 .. max_len+k-2 (k answer tokens:
the "Answer:" token predicts the first answer token, ..., the last name token predicts the
newline): the loss is on the answer tokens only; `answer_group` 0 there (one answer per example).
answer_len: the tokens of an answer of max_op names (names must all cost the same number of
tokens, which holds for tokenizers that split digits, e.g. SmolLM2's: " V123456," is 8 tokens).

Length control in the model's tokens: each example draws a target length t uniformly in
[min_len, max_len] (tokens of the encoded prompt, question and "Answer:" included); the
generator makes a problem longer than max_len (its own word count set from the tokenizer's
cheapest statement), then distractor statements are dropped from the end of the shown order
until the encoded prompt fits t. Dropping distractors keeps the answer: they are never derivable.
With a digit-splitting tokenizer every prompt lies in [min_len - 20, max_len] (20: one
statement's tokens); with SmolLM2 a statement is 12-20 tokens (2.2x the word-level task's).

Eval sets op1, op2, ... fix the op count as in gsm_symbolic; floors (`gsm_symbolic.
problem_floors`, measured on the set's decoded text): root-only, all-derivable, the most common
set and the empty set; chance 1 / (2^op - 1).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sleep_lm.common.validation import FieldError, check_int, expect
from sleep_lm.tasks import gsm_symbolic as gs
from sleep_lm.tasks.base import BATCH_KEYS, Task, mix64

ANSWER_END = "\n"
_S_TEXT_LEN = np.uint64(0x7E47_0000_0000_95A1)
_PROBE_NAMES = (0, 999_999, 123_456, 654_321, 100_000, 909_090, 555_555, 31_415)


@functools.cache
def _load_tokenizer(folder: str):
  from sleep_lm.pretrained.tokenizer import from_hf
  digest = hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()[:12]
  return from_hf(folder), digest


def tokenizer_folder(path: str) -> Path:
  """The folder holding tokenizer.json: `path` itself or a converted workdir's tokenizer/."""
  p = Path(path)
  for folder in (p, p / "tokenizer"):
    if (folder / "tokenizer.json").is_file():
      return folder.resolve()
  raise FieldError("tokenizer", f"must name a workdir written by sleep_lm.pretrained.convert "
                   f"(its tokenizer/tokenizer.json) or a folder holding tokenizer.json, got "
                   f"{path!r}")


# ----------------------------------------------------------------------------- reading text back

_QUESTION = re.compile(r"Question: which of the variables whose values can be derived are equal "
                       r"to (-?\d+)\?\n")
_STATEMENT = re.compile(r"assign V(\d{6}) = (?:(-?\d+)|V(\d{6})(?: ([+-]) 1)?)\.")
_ANSWER = re.compile(r" V(\d{6})(?:, V(\d{6}))*\n")


def parse_text(text: str) -> gs.Problem:
  """The problem a rendered example shows (`gsm_symbolic.render_text` + the answer's newline,
  question first): the inverse of the rendering, answer included (op: the number of derivable
  variables, by `gsm_symbolic.solve`). A text that is not such a rendering is a ValueError."""
  question = _QUESTION.match(text)
  marker = text.rfind("\n" + gs.ANSWER_TEXT)
  if question is None or marker < 0:
    raise ValueError(f"not a rendered problem (question first, then '{gs.ANSWER_TEXT}'): "
                     f"{text[:80]!r}...")
  context = text[question.end():marker]
  statements = []
  for m in _STATEMENT.finditer(context):
    lhs, const, rhs, sign = m.groups()
    statements.append(gs.Statement(int(lhs), None, int(const)) if rhs is None else gs.Statement(
        int(lhs), int(rhs), {None: 0, "+": 1, "-": -1}[sign]))
  if " ".join(gs.statement_text(s) for s in statements) != context:
    raise ValueError(f"the context is not a list of statements: {context[:80]!r}...")
  answer_text = text[marker + 1 + len(gs.ANSWER_TEXT):]
  if _ANSWER.fullmatch(answer_text) is None:
    raise ValueError(f"the answer is not a list of names ended by a newline: {answer_text!r}")
  answer = tuple(int(x) for x in re.findall(r"V(\d{6})", answer_text))
  problem = gs.Problem(int(question.group(1)), tuple(statements), answer, 0)
  return problem._replace(op=len(gs.solve(problem)))


# ------------------------------------------------------------------------------------- the task

@dataclasses.dataclass(frozen=True)
class GsmText(Task):
  """The task interface (`config.task`: name="gsm_text" and the fields below).

  tokenizer: a converted workdir (`sleep_lm.pretrained.convert`) or a folder with tokenizer.json.
  vocab_size: the model's vocabulary (embedding rows; at least the tokenizer's).
  seed: keys the eval sets and, mixed with each model seed, the training streams.
  min_len, max_len: the prompt's length range in the model's tokens; seq_len = max_len +
    answer_len (answer_len: an answer of max_op names, from the tokenizer).
  min_op, max_op: training draws op uniformly in [min_op, max_op]; eval_ops: one eval set
    "op<k>" per k (each k <= max_op).
  """

  name = "gsm_text"

  tokenizer: str = ""
  vocab_size: int = 0
  seed: int = 0
  min_len: int = 1024
  max_len: int = 1984
  min_op: int = 1
  max_op: int = 8
  eval_ops: tuple[int, ...] = gs.EVAL_OPS

  def __post_init__(self):
    ops = self.eval_ops
    expect(not isinstance(ops, (int, np.integer)) and isinstance(ops, Sequence) and len(ops) > 0,
           "eval_ops", f"must be a non-empty list of op counts, got {ops!r}")
    object.__setattr__(self, "eval_ops", tuple(ops))
    check_int("seed", self.seed, 0)
    check_int("max_op", self.max_op, 1, gs.MAX_OP)
    check_int("min_op", self.min_op, 1, self.max_op)
    for k in self.eval_ops:
      check_int("eval_ops", k, 1, self.max_op)
    expect(len(set(self.eval_ops)) == len(self.eval_ops), "eval_ops",
           f"must not repeat an op count, got {self.eval_ops}")
    expect(isinstance(self.tokenizer, str) and len(self.tokenizer) > 0, "tokenizer",
           f"must name a converted workdir or a folder holding tokenizer.json, got "
           f"{self.tokenizer!r}")
    tok = self.text_tokenizer
    check_int("vocab_size", self.vocab_size, tok.vocab_size)
    expect(self.pad_id is not None, "tokenizer",
           f"{self.tokenizer!r} has neither a pad nor an eos id to pad with")
    core = self._prompt_base + self._costs["root"] + (self.max_op - 1) * self._costs["step_max"]
    check_int("min_len", self.min_len, core)     # the longest core must fit the shortest prompt
    check_int("max_len", self.max_len, self.min_len)

  # --------------------------------------------------------------------- the tokenizer's numbers

  @property
  def text_tokenizer(self):
    return _load_tokenizer(str(tokenizer_folder(self.tokenizer)))[0]

  @functools.cached_property
  def pad_id(self) -> int | None:
    tok = self.text_tokenizer
    return tok.pad_id if tok.pad_id is not None else (tok.eos_ids[0] if tok.eos_ids else None)

  def encode_prompt(self, problems: Sequence[gs.Problem]) -> list[list[int]]:
    enc = self.text_tokenizer.tokenizer.encode_batch([gs.render_prompt(p) for p in problems])
    return [e.ids for e in enc]

  def encode_answer(self, problems: Sequence[gs.Problem]) -> list[list[int]]:
    enc = self.text_tokenizer.tokenizer.encode_batch(
        [gs.render_answer(p) + ANSWER_END for p in problems], add_special_tokens=False)
    return [e.ids for e in enc]

  def _statement_costs(self, statements: Sequence[gs.Statement]) -> list[int]:
    enc = self.text_tokenizer.tokenizer.encode_batch(
        [" " + gs.statement_text(s) for s in statements], add_special_tokens=False)
    return [len(e.ids) for e in enc]

  @functools.cached_property
  def _costs(self) -> dict:
    """Tokens per statement kind over probe names: the cheapest per word-level token (to size
    the generator) and the dearest (to bound the core)."""
    n = _PROBE_NAMES
    kinds = {"root": [gs.Statement(a, None, gs.MAX_CONST) for a in n],
             "copy": [gs.Statement(a, b, 0) for a, b in zip(n, n[::-1], strict=True)],
             "step": [gs.Statement(a, b, s) for a, b in zip(n, n[1:] + n[:1], strict=True)
                      for s in (1, -1)]}
    words = {"root": gs.ROOT_LEN, "copy": gs.COPY_LEN, "step": gs.STEP_LEN}
    cost = {k: self._statement_costs(v) for k, v in kinds.items()}
    return {"per_word": min(min(c) / words[k] for k, c in cost.items()),
            "root": max(cost["root"]), "step_max": max(cost["step"] + cost["copy"])}

  @functools.cached_property
  def _prompt_base(self) -> int:
    """Tokens of a prompt without statements (question, newlines, "Answer:", BOS if any)."""
    return len(self.encode_prompt([gs.Problem(gs.MAX_CONST + gs.MAX_OP - 1, (), (0,), 1)])[0])

  @functools.cached_property
  def answer_len(self) -> int:
    """Tokens of an answer of max_op names with its newline; every name must cost the same."""
    lengths = {len(ids) for ids in self.encode_answer(
        [gs.Problem(0, (), tuple(sorted({a, *_PROBE_NAMES[1:self.max_op]})), 1)
         for a in _PROBE_NAMES[:1] + (1, 500_000, 888_888)])}
    singles = {len(ids) for ids in self.encode_answer([gs.Problem(0, (), (a,), 1)
                                                       for a in _PROBE_NAMES])}
    if len(lengths) != 1 or len(singles) != 1:
      raise ValueError(f"tokenizer {self.tokenizer!r}: variable names take different numbers "
                       f"of tokens ({sorted(singles)}); the answer region needs a tokenizer that "
                       f"splits digits (SmolLM2, StarCoder)")
    return lengths.pop()

  @property
  def seq_len(self) -> int:
    return self.max_len + self.answer_len

  def _generator(self, split: str, seed: int, op: int | None) -> gs.GsmSymbolicTask:
    """The word-level generator, sized so that every problem's prompt exceeds max_len tokens."""
    words = math.ceil((self.max_len - self._prompt_base) / self._costs["per_word"])
    low = words + gs.QUESTION_LEN + gs.LENGTH_SLACK + 1
    return gs.GsmSymbolicTask(seed=seed, split=split, op=op, min_len=low,
                              max_len=low + gs.LENGTH_SLACK, min_op=self.min_op,
                              max_op=self.max_op)

  # --------------------------------------------------------------------------------- examples

  def problems(self, split: str, seed: int, op: int | None, indices) -> list[gs.Problem]:
    """The problems of `indices`, trimmed to their drawn token lengths (see the docstring)."""
    gen = self._generator(split, seed, op)
    keys = gen._keys(indices)
    span = self.max_len - self.min_len + 1
    targets = self.min_len + gs._below(mix64(keys ^ _S_TEXT_LEN), span)
    out = []
    for problem, target in zip(gen.problems(indices), targets.tolist(), strict=True):
      derivable = gs.solve(problem)
      costs = self._statement_costs(problem.statements)
      budget = target - self._prompt_base - sum(
          c for s, c in zip(problem.statements, costs, strict=True) if s.lhs in derivable)
      kept = []
      for s, c in zip(problem.statements, costs, strict=True):
        if s.lhs in derivable:
          kept.append(s)
        elif c <= budget:
          kept.append(s)
          budget -= c
        else:
          budget = -1                            # a prefix of the distractors, in shown order
      problem = problem._replace(statements=tuple(kept))
      while len(self.encode_prompt([problem])[0]) > target:   # merges across statements
        last = max(i for i, s in enumerate(problem.statements) if s.lhs not in derivable)
        problem = problem._replace(statements=problem.statements[:last]
                                   + problem.statements[last + 1:])
      out.append(problem)
    return out

  def examples(self, split: str, seed: int, op: int | None, indices) -> dict[str, np.ndarray]:
    """Examples of `indices` (BATCH_KEYS, and "length": prompt tokens, "op", int32 [n])."""
    problems = self.problems(split, seed, op, indices)
    prompts, answers = self.encode_prompt(problems), self.encode_answer(problems)
    m, t, p0 = len(problems), self.seq_len, self.max_len
    inputs = np.full((m, t), self.pad_id, np.int32)
    targets = np.zeros((m, t), np.int32)
    mask = np.zeros((m, t), np.float32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
      if len(prompt) > p0 or len(answer) > self.answer_len:
        raise AssertionError(f"example {i}: {len(prompt)} prompt / {len(answer)} answer tokens "
                             f"past {p0} / {self.answer_len}")
      inputs[i, p0 - len(prompt):p0] = prompt
      inputs[i, p0:p0 + len(answer)] = answer
      targets[i, p0 - 1:p0 - 1 + len(answer)] = answer
      mask[i, p0 - 1:p0 - 1 + len(answer)] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": mask,
            "answer_group": np.where(mask > 0, 0, -1).astype(np.int32),
            "length": np.array([len(p) for p in prompts], np.int32),
            "op": np.array([p.op for p in problems], np.int32)}

  def text(self, inputs: np.ndarray) -> str:
    """The text an example's tokens (int [seq_len]) show, special tokens (PAD, BOS) left out."""
    return self.text_tokenizer.decode(np.asarray(inputs).tolist(), skip_special_tokens=True)

  # ------------------------------------------------------------------------ the task interface

  def train_examples(self, data_seed: int, indices) -> dict[str, np.ndarray]:
    batch = self.examples("train", self.seed + data_seed, None, indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_names(self) -> tuple[str, ...]:
    return tuple(f"op{k}" for k in self.eval_ops)

  def eval_examples(self, name: str, indices) -> dict[str, np.ndarray]:
    self._check_eval_name(name)
    batch = self.examples("eval", self.seed, int(name[2:]), indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_id(self, name: str) -> str:
    # The content depends on these fields and the tokenizer file (by its hash), not its path.
    self._check_eval_name(name)
    digest = _load_tokenizer(str(tokenizer_folder(self.tokenizer)))[1]
    return (f"gsm_text_{name}_len{self.min_len}-{self.max_len}_maxop{self.max_op}_"
            f"tok{digest}_s{self.seed}")

  def chance(self, name: str) -> dict[str, float]:
    self._check_eval_name(name)
    return gs.subset_chance(int(name[2:]))

  def set_floors(self, name: str, batch: dict[str, np.ndarray]) -> dict[str, float]:
    self._check_eval_name(name)
    return gs.problem_floors([parse_text(self.text(row)) for row in batch["inputs"]])

  def layout_mask(self) -> np.ndarray:
    """Every position that can be supervised: the same windows as every example's own mask."""
    mask = np.zeros(self.seq_len, np.float32)
    mask[self.max_len - 1:self.seq_len - 1] = 1.0
    return mask

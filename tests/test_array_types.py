"""Shape checks at the boundaries (kernels/array_types.py): on in the test session, off for users.

tests/conftest.py sets SLEEP_LM_TYPECHECK=1, so every `typed` call in the suite checks its
arrays; these tests check that a wrong shape is caught at each kind of boundary (the op's
implementation contract, sleep, the model's window pass, decoding) and that without the variable
`typed` is the function itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from kernels import array_types
from kernels.gated_delta_rule import api
from sleep_lm.inference import decoding
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import init_params
from sleep_lm.model.layers import TRAIN
from sleep_lm.model.sleep import parallel_forward, sleep_forward

CONFIG = ModelConfig(vocab_size=16, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
                     gdn_head_dim=16, mlp_dim=48, window=4, passes=2)


def test_checks_are_on_in_tests():
  assert array_types.CHECK, "SLEEP_LM_TYPECHECK is not 1: is beartype (the test extra) installed?"

  def identity(x):
    return x

  assert array_types.typed(identity) is not identity


def test_off_without_the_variable():
  env = {k: v for k, v in os.environ.items() if k != "SLEEP_LM_TYPECHECK"}
  code = ("from kernels import array_types as a; f = lambda x: x; "
          "assert not a.CHECK and a.typed(f) is f")
  subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_an_implementation_breaking_the_contract_is_caught():
  q = jnp.ones((1, 8, 2, 4))
  v, g = jnp.ones((1, 8, 2, 3)), -0.1 * jnp.ones((1, 8, 2))
  state = jnp.zeros((1, 2, 4, 3))
  fine = lambda q, k, v, g, beta, s, **kw: (v, s)
  o, s = api._call(fine, q, q, v, g, g, state)
  assert o.shape == v.shape and s.shape == state.shape
  dropped_a_head = lambda q, k, v, g, beta, s, **kw: (v[:, :, :1], s)
  with pytest.raises(TypeCheckError, match="return value"):
    api._call(dropped_a_head, q, q, v, g, g, state)
  with pytest.raises(TypeCheckError):        # g of [B,T] where [B,T,H] is due
    api._call(fine, q, q, v, g[..., 0], g, state)


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


def test_sleep_and_the_window_pass_check_their_inputs(params):
  tokens = jnp.zeros((2, 8), jnp.int32)
  out = sleep_forward(CONFIG, params, tokens, jnp.ones((2, 8)))
  assert out.logits.shape == (2, 8, 16)
  with pytest.raises(TypeCheckError):        # the mask of another length than the tokens
    sleep_forward(CONFIG, params, tokens, jnp.ones((2, 7)))
  with pytest.raises(TypeCheckError):        # float tokens
    parallel_forward(CONFIG, params, tokens.astype(jnp.float32))


def test_decoding_checks_tokens_and_logits(params):
  lay = decoding.cache_layout(CONFIG)
  state = decoding.init_state(CONFIG, 2)
  state, logits = decoding.wake(CONFIG, lay, TRAIN, params, state, jnp.zeros((2, 1), jnp.int32))
  assert logits.shape == (2, 1, 16)
  with pytest.raises(TypeCheckError):        # tokens [B] where [B,T] is due
    decoding.wake(CONFIG, lay, TRAIN, params, state, jnp.zeros((2,), jnp.int32))
  assert decoding.sample(logits[:, -1], jax.random.key(0)).shape == (2,)
  with pytest.raises(TypeCheckError):        # [B,T,V] where [B,V] is due
    decoding.sample(logits, jax.random.key(0))

"""K-FAC layer registration and statistics (kfac_layers), §6.

Registration by key path, the default rule for plain trees, masking, the
errors a user sees, the kernel/bias block layout and the statistics'
scaling (``Â Γ̂ᵀ`` is the gradient), against numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kronopt.preconditioners import kfac_layers as kl


def params():
  z = jnp.zeros
  return {
      "dense": {"kernel": z((5, 3)), "bias": z((3,))},
      "nobias": {"kernel": z((3, 2))},
      "conv": {"kernel": z((2, 2, 3, 4)), "bias": z((4,))},
      "w": z((4, 4)),
      "emb": {"embedding": z((7, 4))},
      "scale": z((4,)),
  }


def test_default_layers_registers_kernels_and_sibling_biases():
  layers = kl.default_layers(params())
  assert layers["dense"] == {"kernel": kl.dense("bias"), "bias": None}
  assert layers["nobias"]["kernel"] == kl.dense(None)
  assert layers["conv"]["kernel"] == kl.conv(2, "bias")
  assert layers["w"] is None and layers["emb"]["embedding"] is None
  resolved = {r.key: r for r in kl.resolve(params())}
  assert sorted(resolved) == [("conv", "kernel"), ("dense", "kernel"),
                              ("nobias", "kernel")]
  assert (resolved[("dense", "kernel")].d_a,
          resolved[("dense", "kernel")].d_g) == (6, 3)
  assert (resolved[("conv", "kernel")].d_a,
          resolved[("conv", "kernel")].d_g) == (13, 4)
  assert resolved[("nobias", "kernel")].d_a == 3


def test_masked_kernels_are_skipped_and_masked_biases_not_folded():
  p = params()
  p["nobias"]["kernel"] = optax.MaskedNode()
  p["dense"]["bias"] = optax.MaskedNode()
  resolved = {r.key: r for r in kl.resolve(p, kl.default_layers(params()))}
  assert ("nobias", "kernel") not in resolved
  dense = resolved[("dense", "kernel")]
  assert dense.bias is None and dense.d_a == 5
  # The statistics still carry the bias row (the capture appends it): it is
  # dropped, leaving the kernel's own factor E[x xᵀ].
  stats = stats_for(params())
  (got,) = [s for r, s in zip(resolved.values(), kl.align_stats(
      p, list(resolved.values()), stats)) if r.key == ("dense", "kernel")]
  np.testing.assert_array_equal(got.a, stats["dense"]["kernel"].a[:5])


@pytest.mark.parametrize("layers,match", [
    ({"missing": {"kernel": kl.dense()}}, "no leaf there"),
    ({"w": kl.KFACLayer((0,), (0,))}, "must split the axes"),
    ({"nobias": {"kernel": kl.dense("bias")}}, "no parameter nobias/bias"),
    ({"dense": {"kernel": kl.dense(None)}, "scale": kl.dense()},
     "must split"),
    ({"w": "dense"}, "expected a KFACLayer"),
])
def test_bad_registration_raises(layers, match):
  with pytest.raises(ValueError, match=match):
    kl.resolve(params(), layers)


def test_bias_of_the_wrong_shape_raises():
  p = params()
  p["dense"]["bias"] = jnp.zeros((4,))
  with pytest.raises(ValueError, match=r"bias dense/bias has shape \(4,\)"):
    kl.resolve(p, {"dense": {"kernel": kl.dense("bias")}})


def stats_for(p):
  rng = np.random.default_rng(0)
  s = lambda d_a, d_g: kl.KFACStats(
      jnp.asarray(rng.standard_normal((d_a, 6)), jnp.float32),
      jnp.asarray(rng.standard_normal((d_g, 6)), jnp.float32))
  return {"dense": {"kernel": s(6, 3), "bias": None},
          "nobias": {"kernel": s(3, 2)}, "conv": {"kernel": s(13, 4)}}


def test_align_stats_by_path_ignores_masked_positions():
  p = params()
  layers = kl.resolve(p)
  stats = stats_for(p)
  got = kl.align_stats(p, layers, stats)
  assert [r.key for r in layers] == [("conv", "kernel"), ("dense", "kernel"),
                                     ("nobias", "kernel")]
  assert got[0] is stats["conv"]["kernel"]
  # optax.masked passes the full stats tree with masked updates.
  masked = dict(p, conv={"kernel": optax.MaskedNode(),
                         "bias": optax.MaskedNode()})
  masked_layers = kl.resolve(masked, kl.default_layers(p))
  got = kl.align_stats(masked, masked_layers, stats)
  assert len(got) == 2 and got[0] is stats["dense"]["kernel"]
  # A layer that was not called has no statistics.
  partial = dict(stats, nobias={"kernel": None})
  assert kl.align_stats(p, layers, partial)[2] is None


def test_missing_or_mismatched_stats_raise_clear_errors():
  p = params()
  layers = kl.resolve(p)
  with pytest.raises(ValueError, match="kfac_stats.*KFACCapture"):
    kl.align_stats(p, layers, None)
  assert kl.align_stats(p, [], None) == []  # nothing registered: not needed
  stats = stats_for(p)
  with pytest.raises(ValueError, match="parameters have no leaf"):
    kl.align_stats(p, layers, dict(stats, extra=stats["dense"]["kernel"]))
  with pytest.raises(ValueError, match="no K-FAC layer is registered.*"
                                       "layers="):
    kl.align_stats(p, layers, dict(stats, w=stats["dense"]["kernel"]))
  with pytest.raises(ValueError, match=r"expected a\[6, n\].*with the bias"):
    kl.align_stats(p, layers, dict(stats, dense={
        "kernel": stats["nobias"]["kernel"]}))
  with pytest.raises(ValueError, match="expected KFACStats or None"):
    kl.align_stats(p, layers, dict(stats, nobias={"kernel": (1, 2)}))


def test_path_key_drops_the_value_attribute_of_variables():
  attr = jax.tree_util.GetAttrKey
  dict_key = jax.tree_util.DictKey
  assert kl.path_key((dict_key("l1"), dict_key("kernel"), attr("value"))) == (
      "l1", "kernel")
  assert kl.path_key((dict_key("value"),)) == ("value",)


@pytest.mark.parametrize("spec,shape,bias_shape", [
    (kl.dense_general(2, 2, "bias"), (3, 2, 4, 5), (4, 5)),
    (kl.conv(2, "bias"), (2, 3, 4, 5), (5,)),
    (kl.KFACLayer((1,), (0,), None), (4, 6), None),
])
def test_block_layout_round_trips(spec, shape, bias_shape):
  rng = np.random.default_rng(1)
  k = rng.standard_normal(shape).astype(np.float32)
  p = {"kernel": jnp.asarray(k)}
  if bias_shape is not None:
    p["bias"] = jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
  (layer,) = kl.resolve(p, {"kernel": spec})
  block = kl.to_block(layer, p["kernel"], p.get("bias"))
  axes = spec.in_axes + spec.out_axes
  d_in = int(np.prod([shape[i] for i in spec.in_axes]))
  want = np.transpose(k, axes).reshape(d_in, -1)
  if bias_shape is not None:
    want = np.vstack([want, np.asarray(p["bias"]).reshape(1, -1)])
  np.testing.assert_array_equal(np.asarray(block), want)
  kernel, bias = kl.from_block(layer, block, p["kernel"], p.get("bias"))
  np.testing.assert_array_equal(np.asarray(kernel), k)
  if bias_shape is not None:
    np.testing.assert_array_equal(np.asarray(bias), np.asarray(p["bias"]))


def test_dense_stats_scaling_gives_the_gradient():
  """Leading axes are rows; Â Âᵀ is the mean of [x,1][x,1]ᵀ; Â Γ̂ᵀ = Σ x dyᵀ."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 4))
  dy = rng.standard_normal((2, 3, 5))
  st = kl.dense_stats(jnp.asarray(x, jnp.float32),
                      jnp.asarray(dy, jnp.float32), bias=True)
  xr = np.hstack([x.reshape(6, 4), np.ones((6, 1))])
  dr = dy.reshape(6, 5)
  np.testing.assert_allclose(np.asarray(st.a) @ np.asarray(st.a).T,
                             xr.T @ xr / 6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(st.g) @ np.asarray(st.g).T,
                             6 * dr.T @ dr, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(st.a) @ np.asarray(st.g).T,
                             xr.T @ dr, rtol=1e-5, atol=1e-6)

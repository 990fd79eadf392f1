import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bd3jax import BD3LM, convert
from bd3jax.masks import AttentionMask, MaskKind
from bd3jax.model import DiT, ModelConfig

V, D, H, COND, LAYERS = 40, 32, 4, 16, 2


def reference_state_dict(seed=0, adaln=True, prefix="backbone."):
  """A random state dict with the reference's names and torch shapes (REFERENCE.md §1)."""
  rng = np.random.default_rng(seed)
  shapes = {"vocab_embed.embedding": (V, D), "rotary_emb.inv_freq": (D // H // 2,),
            "output_layer.norm_final.weight": (D,), "output_layer.linear.weight": (V, D),
            "output_layer.linear.bias": (V,)}
  if adaln:
    shapes.update({"sigma_map.mlp.0.weight": (COND, 256), "sigma_map.mlp.0.bias": (COND,),
                   "sigma_map.mlp.2.weight": (COND, COND), "sigma_map.mlp.2.bias": (COND,),
                   "output_layer.adaLN_modulation.weight": (2 * D, COND),
                   "output_layer.adaLN_modulation.bias": (2 * D,)})
  for i in range(LAYERS):
    p = f"blocks.{i}."
    shapes.update({p + "norm1.weight": (D,), p + "attn_qkv.weight": (3 * D, D),
                   p + "attn_out.weight": (D, D), p + "norm2.weight": (D,),
                   p + "mlp.0.weight": (4 * D, D), p + "mlp.0.bias": (4 * D,),
                   p + "mlp.2.weight": (D, 4 * D), p + "mlp.2.bias": (D,)})
    if adaln:
      shapes.update({p + "adaLN_modulation.weight": (6 * D, COND), p + "adaLN_modulation.bias": (6 * D,)})
  return {prefix + k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("adaln", [True, False])
def test_round_trip_reproduces_every_tensor(adaln):
  sd = reference_state_dict(adaln=adaln)
  params = convert.from_reference(sd, n_heads=H)
  cfg = ModelConfig(vocab_size=V, n_layers=LAYERS, d_model=D, n_heads=H, cond_dim=COND, adaln=adaln)
  mask = AttentionMask(MaskKind.BLOCK_CAUSAL, 8, 4)
  expected = jax.eval_shape(lambda: DiT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), None, mask))
  import flax.linen as nn
  expected = nn.unbox(expected["params"])
  assert jax.tree.structure(expected) == jax.tree.structure(params)
  jax.tree.map(lambda e, p: np.testing.assert_equal(e.shape, p.shape), expected, params)
  back = convert.to_reference(params)
  sd.pop("backbone.rotary_emb.inv_freq")
  assert sorted(back) == sorted(sd)
  for name in sd:
    np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


def test_qkv_layout_is_three_heads_head_dim():
  sd = reference_state_dict()
  params = convert.from_reference(sd, n_heads=H)
  w = sd["backbone.blocks.0.attn_qkv.weight"]
  h = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
  torch_qkv = (h @ w.T).reshape(5, 3, H, D // H)  # rearrange '(three h d)'
  ours = np.einsum("td,dshk->tshk", h, params["blocks_0"]["attn_qkv"]["kernel"])
  np.testing.assert_allclose(ours, torch_qkv, rtol=1e-5, atol=1e-5)
  o = sd["backbone.blocks.0.attn_out.weight"]
  a = np.random.default_rng(2).standard_normal((5, H, D // H)).astype(np.float32)
  np.testing.assert_allclose(np.einsum("thk,hkd->td", a, params["blocks_0"]["attn_out"]["kernel"]),
                             a.reshape(5, D) @ o.T, rtol=1e-5, atol=1e-5)


def test_converted_model_is_finite_and_uses_every_layer():
  sd = reference_state_dict()
  model = BD3LM.from_reference_checkpoint(sd, n_heads=H, block_size=4, length=16, mask_id=V - 1,
                                          bos_id=0, eos_id=1)
  rng = np.random.default_rng(3)
  x0 = rng.integers(0, V - 1, (2, 16))
  xt = np.where(rng.random((2, 16)) < 0.5, V - 1, x0)
  base = np.asarray(model.logits(xt, x0))
  assert base.shape == (2, 16, V) and np.isfinite(base).all()
  for name in [f"backbone.blocks.{i}.attn_qkv.weight" for i in range(LAYERS)] + [
      "backbone.sigma_map.mlp.0.bias", "backbone.vocab_embed.embedding"]:
    changed = dict(sd)
    changed[name] = sd[name] + 0.5
    other = BD3LM.from_reference_checkpoint(changed, n_heads=H, block_size=4, length=16,
                                            mask_id=V - 1, bos_id=0, eos_id=1)
    assert not np.allclose(np.asarray(other.logits(xt, x0)), base), name
  np.testing.assert_array_equal(model.to_reference()["backbone.blocks.1.mlp.0.weight"],
                                sd["backbone.blocks.1.mlp.0.weight"])


def test_missing_and_extra_tensors_are_named():
  sd = reference_state_dict()
  del sd["backbone.blocks.1.norm2.weight"]
  with pytest.raises(convert.ConversionError, match=r"missing tensor blocks.1.norm2.weight"):
    convert.from_reference(sd, n_heads=H)
  sd = reference_state_dict()
  sd["backbone.blocks.0.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError, match=r"unexpected tensors \['blocks.0.extra.weight'\]"):
    convert.from_reference(sd, n_heads=H)
  with pytest.raises(ValueError, match="n_heads, block_size, length cannot be read off"):
    BD3LM.from_reference_checkpoint(reference_state_dict())
  with pytest.raises(ValueError, match="cannot tell the mask_id, bos_id, eos_id"):
    BD3LM.from_reference_checkpoint(reference_state_dict(), n_heads=H, block_size=4, length=16)


def test_safetensors_file_and_hf_folder(tmp_path):
  from safetensors.numpy import save_file
  sd = reference_state_dict(prefix="")
  save_file(sd, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(
      {"n_heads": H, "block_size": 4, "model_length": 16, "hidden_dim": D, "cond_dim": COND}))
  ids = dict(mask_id=V - 1, bos_id=0, eos_id=1)
  from_folder = BD3LM.from_reference_checkpoint(str(tmp_path), **ids)
  assert (from_folder.block_size, from_folder.length, from_folder.model_cfg.n_heads) == (4, 16, H)
  from_file = BD3LM.from_reference_checkpoint(str(tmp_path / "model.safetensors"), n_heads=H,
                                              block_size=4, length=16, **ids)
  x = np.zeros((1, 16), np.int64)
  np.testing.assert_array_equal(from_folder.logits(x, x), from_file.logits(x, x))


def test_facade_nelbo_and_generation_ids():
  sd = reference_state_dict()
  model = BD3LM.from_reference_checkpoint(sd, n_heads=H, block_size=4, length=16, mask_id=V - 1,
                                          bos_id=0, eos_id=1)
  tokens = np.random.default_rng(4).integers(0, V - 1, (3, 16))
  per_token = model.nelbo(tokens, seed=0)
  assert per_token.shape == (3, 16) and np.isfinite(per_token).all() and (per_token >= 0).all()
  np.testing.assert_array_equal(per_token, model.nelbo(tokens, seed=0))
  ids = model.generate_ids(2, max_length=8, steps=2, seed=1)
  assert len(ids) == 2 and all(1 <= len(row) <= 8 and row[0] == 0 and not (row == V - 1).any()
                               for row in ids)
  prompted = model.generate_ids(2, max_length=8, steps=2, prompts=[[5, 6, 7], [8]], progress=True)
  assert prompted[0][:4].tolist() == [0, 5, 6, 7] and prompted[1][:2].tolist() == [0, 8]
  with pytest.raises(ValueError, match="no tokenizer"):
    model.generate(1)
  beyond = model.generate_ids(1, max_length=24, steps=1)  # past the context: sliding window
  assert 1 <= len(beyond[0]) <= 24


def test_mdlm_folder_is_one_block(tmp_path):
  from safetensors.numpy import save_file
  save_file(reference_state_dict(), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mdlm", "n_heads": H,
                                                    "model_length": 16}))
  model = BD3LM.from_reference_checkpoint(str(tmp_path), mask_id=V - 1, bos_id=0, eos_id=1)
  assert model.block_size == model.length == 16


def test_lightning_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  sd = reference_state_dict()
  state = {k: torch.from_numpy(v) for k, v in sd.items()}
  state["noise.sigma_max"] = torch.zeros(())  # other modules of the training wrapper are skipped
  torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
  model = BD3LM.from_reference_checkpoint(str(tmp_path / "last.ckpt"), n_heads=H, block_size=4,
                                          length=16, mask_id=V - 1, bos_id=0, eos_id=1)
  back = model.to_reference()
  np.testing.assert_array_equal(back["backbone.blocks.0.attn_qkv.weight"],
                                sd["backbone.blocks.0.attn_qkv.weight"])
  torch.save(state, tmp_path / "pytorch_model.bin")
  with pytest.raises(convert.ConversionError, match=r"unexpected tensors \['noise.sigma_max'\]"):
    convert.from_reference(convert.read_state_dict(str(tmp_path / "pytorch_model.bin"))[0], n_heads=H)

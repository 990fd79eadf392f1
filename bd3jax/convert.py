"""Conversion between the reference implementation's state dict and bd3jax parameters.

Reference names and torch layouts are in REFERENCE.md §1: `nn.Linear` weights are [out, in]
(bd3jax kernels are [in, out]); `attn_qkv` outputs are laid out (three, heads, head_dim) and
`attn_out` inputs (heads, head_dim), which bd3jax keeps as separate kernel axes.
"""

import json
import os
import re
from typing import Any, Mapping

import numpy as np

PREFIX = "backbone."
BUFFERS = ("rotary_emb.inv_freq",)  # recomputed, not learned: accepted and ignored


class ConversionError(ValueError):
  """A state dict that does not describe a reference DiT, naming the tensors at fault."""


def _strip(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in state.items():
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    out[name] = np.asarray(value.float().numpy() if hasattr(value, "float") else value)
  return out


def _n_layers(names) -> int:
  indices = {int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
  if indices != set(range(len(indices))):
    raise ConversionError(f"block indices {sorted(indices)} are not 0..{len(indices) - 1}")
  return len(indices)


def infer_sizes(state: Mapping[str, Any]) -> dict[str, Any]:
  """vocab_size, d_model, n_layers, cond_dim and adaln, read off the tensor shapes."""
  state = _strip(state)
  if "vocab_embed.embedding" not in state:
    raise ConversionError("missing tensor vocab_embed.embedding: not a reference DiT state dict")
  vocab_size, d_model = state["vocab_embed.embedding"].shape
  adaln = "sigma_map.mlp.0.weight" in state
  cond_dim = state["sigma_map.mlp.0.weight"].shape[0] if adaln else None
  return {"vocab_size": int(vocab_size), "d_model": int(d_model), "n_layers": _n_layers(state),
          "cond_dim": None if cond_dim is None else int(cond_dim), "adaln": adaln}


def _linear(w_OI, b_O=None) -> dict:
  out = {"kernel": w_OI.T}
  if b_O is not None:
    out["bias"] = b_O
  return out


def from_reference(state: Mapping[str, Any], n_heads: int) -> dict:
  """bd3jax parameters from a reference state dict (with or without the `backbone.` prefix)."""
  sd = _strip(state)
  sizes = infer_sizes(sd)
  d, adaln = sizes["d_model"], sizes["adaln"]
  if d % n_heads:
    raise ConversionError(f"n_heads {n_heads} does not divide the width {d}")
  k = d // n_heads
  used = set(BUFFERS) & set(sd)

  def take(name):
    if name not in sd:
      raise ConversionError(f"missing tensor {name}")
    used.add(name)
    return sd[name]

  params = {"vocab_embed": take("vocab_embed.embedding")}
  if adaln:
    params["sigma_map"] = {
        "mlp_0": _linear(take("sigma_map.mlp.0.weight"), take("sigma_map.mlp.0.bias")),
        "mlp_2": _linear(take("sigma_map.mlp.2.weight"), take("sigma_map.mlp.2.bias"))}
  for i in range(sizes["n_layers"]):
    p = f"blocks.{i}."
    block = {
        "norm1": {"weight": take(p + "norm1.weight")},
        "attn_qkv": {"kernel": take(p + "attn_qkv.weight").T.reshape(d, 3, n_heads, k)},
        "attn_out": {"kernel": take(p + "attn_out.weight").T.reshape(n_heads, k, d)},
        "norm2": {"weight": take(p + "norm2.weight")},
        "mlp_0": _linear(take(p + "mlp.0.weight"), take(p + "mlp.0.bias")),
        "mlp_2": _linear(take(p + "mlp.2.weight"), take(p + "mlp.2.bias")),
    }
    if adaln:
      block["adaLN_modulation"] = _linear(take(p + "adaLN_modulation.weight"),
                                          take(p + "adaLN_modulation.bias"))
    params[f"blocks_{i}"] = block
  out_layer = {"norm_final": {"weight": take("output_layer.norm_final.weight")},
               "linear": _linear(take("output_layer.linear.weight"), take("output_layer.linear.bias"))}
  if adaln:
    out_layer["adaLN_modulation"] = _linear(take("output_layer.adaLN_modulation.weight"),
                                            take("output_layer.adaLN_modulation.bias"))
  params["output_layer"] = out_layer
  extra = sorted(set(sd) - used)
  if extra:
    raise ConversionError(f"unexpected tensors {extra}: not part of the reference DiT")
  return params


def to_reference(params: Mapping[str, Any], *, prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """The reference state dict (torch layouts, numpy arrays) of bd3jax parameters."""
  p = {k: v for k, v in params.items()}
  out = {"vocab_embed.embedding": p["vocab_embed"]}

  def linear(name, node):
    out[name + ".weight"] = np.asarray(node["kernel"]).T
    if "bias" in node:
      out[name + ".bias"] = node["bias"]

  if "sigma_map" in p:
    linear("sigma_map.mlp.0", p["sigma_map"]["mlp_0"])
    linear("sigma_map.mlp.2", p["sigma_map"]["mlp_2"])
  i = 0
  while f"blocks_{i}" in p:
    b, name = p[f"blocks_{i}"], f"blocks.{i}."
    qkv = np.asarray(b["attn_qkv"]["kernel"])
    o = np.asarray(b["attn_out"]["kernel"])
    out[name + "norm1.weight"] = b["norm1"]["weight"]
    out[name + "attn_qkv.weight"] = qkv.reshape(qkv.shape[0], -1).T
    out[name + "attn_out.weight"] = o.reshape(-1, o.shape[-1]).T
    out[name + "norm2.weight"] = b["norm2"]["weight"]
    linear(name + "mlp.0", b["mlp_0"])
    linear(name + "mlp.2", b["mlp_2"])
    if "adaLN_modulation" in b:
      linear(name + "adaLN_modulation", b["adaLN_modulation"])
    i += 1
  o = p["output_layer"]
  out["output_layer.norm_final.weight"] = o["norm_final"]["weight"]
  linear("output_layer.linear", o["linear"])
  if "adaLN_modulation" in o:
    linear("output_layer.adaLN_modulation", o["adaLN_modulation"])
  return {prefix + k: np.asarray(v) for k, v in out.items()}


def _torch_state_dict(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch: pip install torch (or convert it to "
                      ".safetensors)") from None
  obj = torch.load(path, map_location="cpu", weights_only=False)
  if isinstance(obj, dict) and "state_dict" in obj:  # a Lightning checkpoint: keep the network
    obj = {k: v for k, v in obj["state_dict"].items() if k.startswith(PREFIX)}
  return dict(obj)


def _safetensors(path: str) -> dict:
  from safetensors.numpy import load_file
  return load_file(path)


def _folder(path: str) -> tuple[dict, dict]:
  config_path = os.path.join(path, "config.json")
  config = json.load(open(config_path)) if os.path.exists(config_path) else {}
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(path, name)):
      return read_state_dict(os.path.join(path, name))[0], config
  raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def read_state_dict(source) -> tuple[dict, dict]:
  """(state dict, config.json contents or {}) from a file, an HF folder, a hub id or a dict."""
  if isinstance(source, Mapping):
    return dict(source), {}
  source = os.fspath(source)
  if os.path.isdir(source):
    return _folder(source)
  if os.path.isfile(source):
    if source.endswith(".safetensors"):
      return _safetensors(source), {}
    if source.endswith((".bin", ".ckpt", ".pt", ".pth")):
      return _torch_state_dict(source), {}
    raise ValueError(f"{source}: expected .safetensors, .bin, .ckpt, .pt or an HF folder")
  if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
    try:
      from huggingface_hub import snapshot_download
    except ImportError:
      raise ImportError(f"{source} looks like a hub id: pip install huggingface_hub, or pass a "
                        "local folder or file") from None
    try:
      folder = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as e:
      raise FileNotFoundError(f"could not download {source} from the hub ({e}); pass a local "
                              "folder or file") from e
    return _folder(folder)
  raise FileNotFoundError(f"{source} is neither a file, a folder nor a hub id")

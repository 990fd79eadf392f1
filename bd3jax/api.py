"""`BD3LM`: load a trained or published BD3-LM and use it, without the training machinery."""

import dataclasses
import json
import functools
import jax
import jax.numpy as jnp
import numpy as np

from bd3jax import convert, diffusion, generative, sampling
from bd3jax.model import DiT, ModelConfig

# Special ids of the paper's tokenizers, by vocabulary size (REFERENCE.md §5).
KNOWN_VOCABULARIES = {
    50258: {"mask_id": 50257, "bos_id": 50256, "eos_id": 50256},  # GPT-2 + appended [MASK]
    30522: {"mask_id": 103, "bos_id": 101, "eos_id": 102},        # bert-base-uncased
}


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  mask_id: int
  bos_id: int
  eos_id: int


def _special_ids(vocab_size, tokenizer, mask_id, bos_id, eos_id) -> SpecialIds:
  found = dict(KNOWN_VOCABULARIES.get(vocab_size, {}))
  if tokenizer is not None:
    found.update(mask_id=tokenizer.mask_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  given = {"mask_id": mask_id, "bos_id": bos_id, "eos_id": eos_id}
  found.update({k: v for k, v in given.items() if v is not None})
  missing = [k for k in ("mask_id", "bos_id", "eos_id") if k not in found]
  if missing:
    raise ValueError(f"cannot tell the {', '.join(missing)} of a {vocab_size}-token vocabulary; "
                     "pass them or a tokenizer")
  return SpecialIds(**found)


class BD3LM:
  """A BD3-LM ready for inference: parameters, network, block size, tokenizer (optional)."""

  def __init__(self, model_cfg: ModelConfig, params, *, length: int, block_size: int,
               tokenizer=None, mask_id: int | None = None, bos_id: int | None = None,
               eos_id: int | None = None):
    if length % block_size:
      raise ValueError(f"block_size {block_size} does not divide length {length}")
    self.model_cfg = model_cfg
    self.params = jax.tree.map(jnp.asarray, params)
    self.length, self.block_size = length, block_size
    self.tokenizer = tokenizer
    self.ids = _special_ids(model_cfg.vocab_size, tokenizer, mask_id, bos_id, eos_id)
    self._model = DiT(model_cfg)

  @property
  def is_autoregressive(self) -> bool:
    return not self.model_cfg.adaln

  @classmethod
  def from_workdir(cls, workdir: str, config=None) -> "BD3LM":
    """The EMA parameters, config and tokenizer of the latest checkpoint of a bd3jax run."""
    import ml_collections

    from bd3jax import checkpoint, train
    from bd3jax import config as config_lib
    meta = checkpoint.read_meta(workdir)
    config = config or ml_collections.ConfigDict(meta["config"])
    tokenizer = checkpoint.tokenizer_from_meta(meta)
    task = train.Task.from_config(config, tokenizer.vocab_size, tokenizer.mask_id)
    abstract = jax.eval_shape(
        lambda: train.init_state(task, task.init_params(jax.random.key(0))))
    params = checkpoint.load_params(workdir, abstract, config, tokenizer.vocab_size)
    model_cfg = dataclasses.replace(config_lib.model_config(config, tokenizer.vocab_size),
                                    dropout=0.0)
    return cls(model_cfg, params, length=config.length, block_size=config.block_size,
               tokenizer=tokenizer)

  @classmethod
  def from_reference_checkpoint(cls, source, *, n_heads: int | None = None,
                                block_size: int | None = None, length: int | None = None,
                                tokenizer=None, **special_ids) -> "BD3LM":
    """A published reference model: a .safetensors / .bin / .ckpt file, an HF folder with
    config.json, an HF hub id (online), or a dict of arrays named as the reference's state dict.

    Sizes come from the tensor shapes and config.json; n_heads, block_size and length must be
    given where config.json does not say them. `special_ids` (mask_id, bos_id, eos_id) default
    to the paper's tokenizers for their vocabulary sizes.
    """
    state, hf_config = convert.read_state_dict(source)
    sizes = convert.infer_sizes(state)
    hf_length = hf_config.get("model_length")
    hf_block = hf_config.get("block_size") or (hf_length if hf_config.get("model_type") == "mdlm"
                                               else None)  # MDLM: one block
    settings = {"n_heads": n_heads or hf_config.get("n_heads"),
                "block_size": block_size or hf_block, "length": length or hf_length}
    missing = [k for k, v in settings.items() if v is None]
    if missing:
      raise ValueError(f"{', '.join(missing)} cannot be read off the checkpoint; pass "
                       + ", ".join(f"{k}=..." for k in missing))
    params = convert.from_reference(state, settings["n_heads"])
    cond_dim = sizes["cond_dim"] or hf_config.get("cond_dim") or 128
    model_cfg = ModelConfig(
        vocab_size=sizes["vocab_size"], n_layers=sizes["n_layers"], d_model=sizes["d_model"],
        n_heads=settings["n_heads"], cond_dim=cond_dim, dropout=0.0, adaln=sizes["adaln"],
        time_conditioning=bool(hf_config.get("time_conditioning", False)))
    return cls(model_cfg, params, length=settings["length"], block_size=settings["block_size"],
               tokenizer=tokenizer, **special_ids)

  def to_reference(self) -> dict[str, np.ndarray]:
    """The parameters under the reference's state-dict names and layouts (`backbone.` prefix)."""
    return convert.to_reference(jax.device_get(self.params))

  def _apply_fn(self, params):
    return lambda tokens, sigma, mask, train=False, head=None: self._model.apply(
        {"params": params}, tokens, sigma, mask, train=False, head=head)

  # Compiled once per model; parameters are arguments, configs and sizes static.
  @functools.cached_property
  def _logits_fn(self):
    return jax.jit(lambda params, xt, x0, sigma, cfg: diffusion.diffusion_logits(
        self._apply_fn(params), xt, x0, sigma, cfg), static_argnums=(4,))

  @functools.cached_property
  def _nelbo_fn(self):
    return jax.jit(lambda params, x0, key, cfg: diffusion.nelbo(
        self._apply_fn(params), x0, key, cfg, train=False)[1]["token_loss"], static_argnums=(3,))


  def _loss_cfg(self, block_size: int, length: int) -> diffusion.LossConfig:
    # t ~ U[1e-3, 1]; every token projected to logits, so no token's loss is subsampled.
    return diffusion.LossConfig(
        algo="ar" if self.is_autoregressive else "bd3lm", length=length, block_size=block_size,
        mask_id=self.ids.mask_id, clip_min=1e-3, clip_max=1.0, resample=False)

  def logits(self, xt, x0, sigma=None) -> jax.Array:
    """Raw network logits [B, L, V] of the x_t half of the x_t ⊕ x_0 pass, before SUBS."""
    xt, x0 = jnp.asarray(xt, jnp.int32), jnp.asarray(x0, jnp.int32)
    cfg = self._loss_cfg(self.block_size, xt.shape[1])
    return self._logits_fn(self.params, xt, x0, sigma, cfg)

  def nelbo(self, token_ids, *, seed: int = 0) -> np.ndarray:
    """Per-token NELBO [B, L] in nats: one t ~ U[1e-3, 1] per block (AR: the exact NLL)."""
    x0 = jnp.asarray(np.atleast_2d(token_ids), jnp.int32)
    if int(x0.max()) >= self.model_cfg.vocab_size or int(x0.min()) < 0:
      raise ValueError(f"token ids must lie in [0, {self.model_cfg.vocab_size})")
    cfg = self._loss_cfg(1 if self.is_autoregressive else self.block_size, x0.shape[1])
    if x0.shape[1] % cfg.block_size:
      raise ValueError(f"length {x0.shape[1]} is not a multiple of block_size {cfg.block_size}")
    return np.asarray(self._nelbo_fn(self.params, x0, jax.random.key(seed), cfg))

  def sample(self, num_samples: int, *, max_length: int | None = None,
             block_size: int | None = None, steps: int | None = None, nucleus_p: float = 0.9,
             seed: int = 0, rule: str = "ddpm", temperature: float = 1.0, prompts=None,
             progress: bool = False) -> sampling.SampleOutput:
    """Samples with the KV-cached sampler: BOS, the prompt (a list of token-id lists), then
    blocks of `block_size` tokens denoised in up to `steps` steps each (see
    `sampling.SamplerConfig` for the rules), each sequence stopping at its first EOS."""
    block_size = 1 if self.is_autoregressive else (block_size or self.block_size)
    cfg = sampling.SamplerConfig(
        length=max_length or self.length, block_size=block_size,
        steps=1 if self.is_autoregressive else (steps or block_size), nucleus_p=nucleus_p,
        autoregressive=self.is_autoregressive, rule=rule, temperature=temperature,
        context=self.length if (max_length or self.length) > self.length else None)
    prompt_BP = prompt_len_B = None
    if prompts is not None:
      num_samples = len(prompts)
      prompt_len_B = np.array([len(p) for p in prompts], np.int32)
      prompt_BP = np.zeros((num_samples, max(prompt_len_B.max(initial=0), 1)), np.int32)
      for row, p in zip(prompt_BP, prompts):
        row[:len(p)] = p
    hook = self._progress.start(cfg.n_blocks) if progress else None
    try:
      return sampling.generate(
          self._model, self.params, jax.random.key(seed), cfg, bos_id=self.ids.bos_id,
          mask_id=self.ids.mask_id, eos_id=self.ids.eos_id, num_samples=num_samples,
          prompt_tokens=prompt_BP, prompt_lengths=prompt_len_B, on_block=hook)
    finally:
      if progress:
        jax.effects_barrier()
        self._progress.close()

  def generate_ids(self, num_samples: int, **kwargs) -> list[np.ndarray]:
    """Token ids of each sample, BOS first, up to and including its EOS (see `sample`)."""
    out = jax.device_get(self.sample(num_samples, **kwargs))
    return [ids[:n] for ids, n in zip(out.tokens_BS, out.lengths_B)]

  def generate(self, num_samples: int, **kwargs) -> list[str]:
    """Decoded samples (see `sample` for the options); needs a tokenizer."""
    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer: use generate_ids, or load it with "
                       "tokenizer=...")
    return [self.tokenizer.decode(ids.tolist()) for ids in self.generate_ids(num_samples, **kwargs)]

  @functools.cached_property
  def _progress(self) -> "_BlockProgress":
    return _BlockProgress()


class _BlockProgress:
  """A tqdm bar over generated blocks. One object per model: the sampler compiles once per
  callback, so the bound method handed to it must stay the same across calls."""

  def __init__(self):
    self._bar = None

  def start(self, total: int):
    from tqdm.auto import tqdm
    self._bar = tqdm(total=total, desc="blocks", unit="block")
    return self.update

  def update(self, block: int) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def close(self) -> None:
    self._bar.close()
    self._bar = None

def sample_workdir(config, workdir: str) -> list[dict]:
  """`config.sample` samples of a run's latest checkpoint, also written to WORKDIR/samples.jsonl
  with their summary (`generative.report`, scored by `config.sample.scorer` if given) in
  WORKDIR/samples_report.json."""
  model = BD3LM.from_workdir(workdir, config)
  s = config.sample
  scorer = generative.load_scorer(s.scorer) if s.scorer else None  # fails before sampling
  out = model.sample(s.num_samples, steps=s.steps, nucleus_p=s.nucleus_p, seed=s.seed, rule=s.rule)
  rows = sampling.rows(out, model.tokenizer.decode)
  if jax.process_index() == 0:
    from etils import epath
    with (epath.Path(workdir) / "samples.jsonl").open("w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    summary = {"scorer": s.scorer or None, **generative.report(rows, scorer)}
    (epath.Path(workdir) / "samples_report.json").write_text(json.dumps(summary, indent=1))
  return rows

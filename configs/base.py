"""Defaults shared by every experiment config; each config file overrides what it needs."""

import ml_collections

MODEL_SIZES = {
    # name: (n_layers, d_model, n_heads, cond_dim), as in the reference DiT.
    "tiny": (8, 256, 8, 64),
    "small": (12, 768, 12, 128),
    "medium": (24, 1024, 16, 128),
}


def model_config(size: str) -> ml_collections.ConfigDict:
  """The network hyperparameters of a named size (tiny / small / medium)."""
  n_layers, d_model, n_heads, cond_dim = MODEL_SIZES[size]
  return ml_collections.ConfigDict(dict(
      n_layers=n_layers,
      d_model=d_model,
      n_heads=n_heads,
      cond_dim=cond_dim,
      mlp_ratio=4,
      dropout=0.1,
      time_conditioning=False,
      dtype="bfloat16",      # compute dtype; parameters are always float32
      attention="dense",     # dense | xla | cudnn | pallas | splash | auto (README)
      layer_norm="xla",      # xla | pallas: residual add, dropout and LayerNorm (README)
  ))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42
  # bd3lm: block diffusion (block_size == length is MDLM, block_size == 1 with
  # full masking is an AR model trained through the diffusion loss).
  # ar: plain causal next-token model (no adaLN), same network code.
  config.algo = "bd3lm"
  config.length = 1024
  config.block_size = 16
  config.model = model_config("small")
  config.init_from = ""      # a workdir or checkpoint directory to take parameters from

  config.noise = ml_collections.ConfigDict(dict(
      schedule="loglinear",  # loglinear (the paper's "linear") | cosine | square | square_root | log
      clip_min=1e-3,         # beta: lower end of the masking-rate interval
      clip_max=1.0,          # omega: upper end
      resample=True,         # redraw blocks whose realised mask fraction is outside [beta, omega]
      antithetic=True,       # low-discrepancy t across (batch, block)
      # Data-driven interval (bd3jax.clip_search): every search_every steps (0: never), move
      # training to the interval of the grid whose held-out per-block NELBO varies least.
      search_every=0,
      search_batches=16,     # held-out batches the variances are measured on
      search_widths=(0.5, 0.6, 0.7, 0.8, 0.9),  # grid: these widths at starts 0, 0.05, ...
      search_chunk=6,        # intervals evaluated at once (vmapped); lower it to save memory
  ))

  config.data = ml_collections.ConfigDict(dict(
      # demo (bundled Python documentation) | text (.txt/.jsonl files) | arrayrecord (ArrayRecord
      # files of UTF-8 documents) | tfds (tfds.data_source, ArrayRecord) | hf (Hugging Face datasets)
      source="text",
      train_files="",        # text / arrayrecord: comma-separated globs
      valid_files="",        # text / arrayrecord held-out files (empty: hold out valid_fraction)
      tfds_name="",          # tfds: dataset name, e.g. lm1b
      hf_path="",            # hf: hub dataset or local folder of data files
      hf_name="",            # hf: dataset configuration (empty: the default)
      data_dir="",           # tfds data_dir / hf cache_dir (empty: the library's default)
      train_split="train",   # tfds / hf split of the training documents (slices like train[:-100000] work)
      valid_split="",        # tfds / hf held-out split (empty: hold out valid_fraction)
      valid_fraction=0.02,
      text_key="text",       # JSONL / tfds / hf field holding the text
      tokenizer="sentencepiece",  # sentencepiece | gpt2 (BPE, mask id appended) | bert (WordPiece)
      tokenizer_path="",     # sentencepiece .model (empty: train one on the training split); gpt2: dir of
                             # vocab.json + merges.txt or a .tiktoken file; bert: vocab.txt or its dir;
                             # gpt2 / bert: otherwise a Hugging Face hub id (empty: gpt2 / bert-base-uncased)
      vocab_size=8192,       # size of a trained sentencepiece vocabulary (mask token included)
      wrap="bos_eos",        # bos_eos: [BOS] + L-2 tokens + [EOS] chunks | eos: EOS after each document
      stream=False,          # tokenize training text on the fly in grain workers, not all at start-up
      prepared_dir="",       # pre-tokenised shards (python -m bd3jax.data.prepare); replaces the source
      shuffle=True,
      num_workers=0,         # grain worker processes (0: in the main process)
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=512,        # global batch, sequences
      grad_accum=1,          # micro-batches per optimiser step
      num_steps=1_000_000,
      lr=3e-4,
      warmup_steps=2500,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,
      ema=0.9999,            # 0 disables the EMA
      log_every=100,
      eval_every=5000,
      eval_batches=16,
      eval_draws=1,          # Monte-Carlo NELBO estimates per held-out sequence (> 1: a standard error)
      checkpoint_every=5000,
      keep_checkpoints=3,
  ))

  # Device mesh (bd3jax.parallel): data x fsdp x tensor must equal the device count; -1 is
  # "the rest". The batch is split over data x fsdp.
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,               # data parallelism: parameters replicated
      fsdp=1,                # data parallelism with parameters and optimiser state sharded
      tensor=1,              # tensor parallelism over heads, MLP units and vocabulary
      dcn_data=1,            # multi-slice TPUs: slices the data axis spans (over the DCN)
      dcn_fsdp=1,            # multi-slice TPUs: slices the fsdp axis spans
  ))

  config.sample = ml_collections.ConfigDict(dict(
      num_samples=4,
      steps=16,              # denoising steps per block (AR: always 1)
      nucleus_p=0.9,
      rule="ddpm",           # ddpm | first_hitting | threshold | entropy | topk
      seed=0,
      # Generative perplexity of the samples (samples_report.json): the workdir of a bd3jax AR
      # run, or hf:NAME_OR_PATH for a Hugging Face causal LM (e.g. hf:gpt2-large); empty: none.
      scorer="",
  ))
  return config

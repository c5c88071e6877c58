"""Common base of every sae-jax config; presets are small files that start from `base.get_config()`.

Fields whose default depends on the SAE preset use a sentinel ("auto" for strings, -1 for numbers)
that `sae_jax.sae.spec_from_config` resolves; `<workdir>/config.json` stores the resolved values.

  python -m experiments.train --config=configs/base.py --workdir=/tmp/sae   # = the synthetic demo
"""

import ml_collections

from sae_jax.data.synthetic import default_synthetic_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.sae = sae = ml_collections.ConfigDict()
  sae.preset = "paper"          # "paper" (Overcomplete TopKSAE, the authors' recipe) | "modern"
  sae.d = 64                    # activation width; must equal the data's
  sae.c = 512                   # dictionary size (concepts)
  sae.k = 16                    # active concepts per row
  sae.decoder = "auto"          # "dense" (z @ D) | "gather" (sum of k rows) | "auto" (per platform)
  sae.compute_dtype = "float32"  # "float32" | "bfloat16" (bf16 matmuls, fp32 params and Adam)
  sae.pre_bias = "auto"         # "yes" | "no": subtract b_dec before encoding, add it after decoding
  sae.b_dec_init = "auto"       # "zeros" | "mean" | "geometric_median" (of the first batches)
  sae.enc_init = "auto"         # "uniform" (torch Linear default) | "tied" (W_enc = D^T)
  sae.decoder_norm = "auto"     # "renorm" (rows renormalised before each step) | "unit_grad"
  sae.l1_coef = -1.0            # paper 0.01 on mean|z|; modern 0
  sae.aux_k = -1                # AuxK latents; modern d/2, paper 0 (off)
  sae.aux_coef = -1.0           # modern 1/32
  sae.dead_tokens = 10_000_000  # a latent is dead after this many tokens without firing

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 8e-4
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.clip_norm = 1.0         # global gradient norm clip; <= 0 disables
  optim.warmup_steps = 0
  optim.decay = "constant"      # "constant" | "cosine" (to 0 at train.num_steps)

  config.data = data = ml_collections.ConfigDict()
  data.source = "synthetic"     # "synthetic" | "shards" | "online"
  data.batch_size = 1024
  data.shard_dir = ""           # for source="shards": directory written by experiments.extract
  data.shuffle_seed = 0
  data.nonfinite = "error"      # NaN/Inf rows: "error" stops the run, "skip" masks and counts them
  data.prefetch = 2             # batches prepared ahead by grain
  data.synthetic = default_synthetic_config()

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 2000
  train.log_every = 100
  train.checkpoint_every = 500
  train.max_to_keep = 3
  train.async_checkpoint = True
  train.init_rows = 8192        # rows used for data-dependent init (b_dec mean / geometric median)
  train.allow_config_change = False  # resume a workdir whose config.json differs
  train.tensorboard = True

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1                # devices on the batch axis; -1 = all devices / mesh.model
  mesh.model = 1                # devices on the dictionary axis
  mesh.multihost = False        # call jax.distributed.initialize (TPU pods / SLURM set the rest)
  mesh.coordinator_address = ""
  mesh.num_processes = 0
  mesh.process_id = -1

  config.analysis = analysis = ml_collections.ConfigDict()
  analysis.sae_workdir = ""     # SAE to analyse; "" = this workdir

  config.retrieval = retrieval = ml_collections.ConfigDict()
  retrieval.sae_workdir = ""

  config.extract = extract = ml_collections.ConfigDict()
  extract.model = ""

  return config

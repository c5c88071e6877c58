"""Common base of every sae-jax config; presets are small files that start from `base.get_config()`.

`get_config` is one function per section (`sae_section()`, `optim_section()`, ...), each declaring
its fields with their defaults; the study's own sections (shapes, encoder_training, study) live in
`configs/study_common.py`, so a run of the core (a plain `experiments.train`) carries none of them.

Fields whose default depends on the SAE preset use a sentinel ("auto" for strings, -1 for numbers)
that `sae_jax.sae.spec_from_config` resolves; `<workdir>/config.json` stores the resolved values.

Run on its own, base trains the `paper` SAE preset (Adam 8e-4, c=512, k=16, 2000 steps of 1024 rows)
on the planted synthetic source; the synthetic demo is `configs/synthetic.py` (the `modern` preset,
lr 4e-3, c=256, k=12), and the model presets set the data, the widths and the extraction:

  python -m experiments.train --config=configs/base.py --workdir=/tmp/sae-base   # ~1.5 min on 2 CPU cores
"""

import ml_collections

from sae_jax.data.synthetic import default_synthetic_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Every section of the core with its defaults (`arg`, the preset argument, is unused here)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.preset_note = ""  # printed under each main's stdout summary (tiny presets: plumbing, not quality)

  config.sae = sae_section()
  config.optim = optim_section()
  config.data = data_section()
  config.train = train_section()
  config.mesh = mesh_section()
  config.analysis = analysis_section()
  config.retrieval = retrieval_section()
  config.extract = extract_section()
  config.concepts = concepts_section()
  return config


def sae_section() -> ml_collections.ConfigDict:
  """`config.sae`: the SAE preset and its architecture (sentinels: `sae_jax.sae.spec_from_config`)."""
  sae = ml_collections.ConfigDict()
  sae.preset = "paper"  # "paper" (Overcomplete TopKSAE, the authors' recipe) | "modern"
  sae.d = 64  # activation width; must equal the data's
  sae.c = 512  # dictionary size (concepts)
  sae.k = 16  # active concepts per row
  sae.decoder = "auto"  # "dense" (z @ D) | "gather" (sum of k rows) | "auto" (per platform)
  sae.backward = "auto"  # "scatter" (B*k-row scatter-adds) | "dense" (GEMMs) | "auto" (per platform)
  sae.top_k = "exact"  # "exact" (lax.top_k, ties to the lower index) | "approx" (lax.approx_max_k)
  sae.approx_recall = 0.95  # recall_target of sae.top_k="approx"
  sae.compute_dtype = "float32"  # "float32" | "bfloat16" (bf16 matmuls, fp32 params and Adam) | "auto"
  sae.pre_bias = "auto"  # "yes" | "no": subtract b_dec before encoding, add it after decoding
  sae.b_dec_init = "auto"  # "zeros" | "mean" | "geometric_median" (of the first batches)
  sae.enc_init = "auto"  # "uniform" (torch Linear default) | "tied" (W_enc = D^T)
  sae.decoder_norm = "auto"  # "renorm" (rows renormalised before each step) | "unit_grad"
  sae.mse = "auto"  # "plain" (paper) | "normalized" (modern: sse / batch variance, Gao et al.)
  sae.l1_coef = -1.0  # paper 0.01 on mean|z|; modern 0
  sae.aux_k = -1  # AuxK latents; modern d/2, paper 0 (off)
  sae.aux_coef = -1.0  # modern 1/32
  sae.dead_tokens = 10_000_000  # a latent is dead after this many tokens without firing
  return sae


def optim_section() -> ml_collections.ConfigDict:
  """`config.optim`: Adam and its learning-rate schedule."""
  optim = ml_collections.ConfigDict()
  optim.lr = 8e-4
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.clip_norm = 1.0  # global gradient norm clip; <= 0 disables
  optim.warmup_steps = 0
  optim.decay = "constant"  # "constant" | "cosine" (to 0 at train.num_steps)
  return optim


def data_section() -> ml_collections.ConfigDict:
  """`config.data`: where the training rows come from and how they are read and batched."""
  data = ml_collections.ConfigDict()
  data.source = "synthetic"  # "synthetic" | "shards" | "online"
  data.batch_size = 1024
  data.shard_dir = ""  # for source="shards": directory written by experiments.extract
  data.shuffle_seed = 0
  data.nonfinite = "error"  # NaN/Inf rows: "error" stops the run, "skip" masks and counts them
  data.prefetch = 2  # batches prepared ahead by grain
  data.shuffle = "global"  # shards: "global" (rows from anywhere, random reads) | "block" (data/pipeline.py)
  data.block_rows = 1024  # shuffle="block": contiguous rows read in one copy
  data.shuffle_buffer_rows = 262144  # shuffle="block": rows shuffled together in RAM (~3 buffers held)
  data.reader_threads = 2  # shards: grain reader threads (and block-copy threads of shuffle="block")
  data.device_prefetch = 2  # batches transferred to the device ahead of the step
  data.synthetic = default_synthetic_config()
  return data


def train_section() -> ml_collections.ConfigDict:
  """`config.train`: the training loop, its checkpoints, resume and logging."""
  train = ml_collections.ConfigDict()
  train.num_steps = 2000
  train.log_every = 100
  # stderr not a terminal: a progress line (step/total, rate, ETA) when no line came for this long
  train.log_every_s = 60.0
  train.checkpoint_every = 500
  train.max_to_keep = 3
  train.async_checkpoint = True
  train.preempt_check_every = 10  # multi-process: steps between the all-hosts check for a SIGTERM
  train.init_rows = 8192  # rows used for data-dependent init (b_dec mean / geometric median)
  train.allow_config_change = False  # resume a workdir whose config.json differs
  train.restore_retries = 4  # a checkpoint read failing with a storage error: retries before stopping
  train.restore_backoff_s = 2.0  # first wait between them; doubled each time (2, 4, 8, 16 s)
  train.tensorboard = True
  train.wandb_project = ""  # "" = off; else the same scalars and the resolved config go to W&B
  train.wandb_entity = ""  # "" = the W&B default entity
  train.wandb_mode = ""  # "" ($WANDB_MODE, else online) | "online" | "offline" (`wandb sync` later)
  return train


def mesh_section() -> ml_collections.ConfigDict:
  """`config.mesh`: the device mesh and the multi-process setup."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # devices on the batch axis; -1 = all devices / mesh.model
  mesh.model = 1  # devices on the dictionary axis
  mesh.shard_optimizer = False  # ZeRO-1: Adam moments split over the data axis too
  mesh.multihost = False  # call jax.distributed.initialize (TPU pods / SLURM set the rest)
  mesh.coordinator_address = ""
  mesh.num_processes = 0
  mesh.process_id = -1
  # Coordination service (multihost): jax's defaults. A process silent for heartbeat_timeout_s is
  # declared dead and the others end; init waits init_timeout_s for every process to connect; the
  # exit barrier waits shutdown_timeout_s.
  mesh.heartbeat_timeout_s = 100
  mesh.init_timeout_s = 300
  mesh.shutdown_timeout_s = 300
  return mesh


def analysis_section() -> ml_collections.ConfigDict:
  """`config.analysis`: experiments.analyze (energy, attribution, bridge; Table 1)."""
  analysis = ml_collections.ConfigDict()
  analysis.sae_workdir = ""  # SAE to analyse; "" = this workdir
  analysis.sae_step = -1  # checkpoint step; -1 = newest
  analysis.source = "auto"  # "auto" (pooled file if present, else synthetic) | "pooled" | "synthetic"
  analysis.embeddings_path = ""  # "" = <workdir or sae_workdir>/activations/pooled_<variant>.npz
  analysis.variant = "mean"  # pooling variant of the pooled file
  analysis.num_pairs = 4096  # synthetic source: matched pairs drawn
  analysis.pair_seed = 1
  analysis.codes = "encode_pooled"  # "encode_pooled" (paper App. B) | "pool_token_codes"
  analysis.energy_weighting = "pairs"  # Eq. 3: "pairs" (images and captions 50/50) | "unique_images"
  analysis.table1_resamples = 0  # Table 1 also as mean ± std over this many random pair subsets; 0 = off
  analysis.table1_resample_fraction = 0.5  # pairs per subset, as a fraction of all
  analysis.tokens_per_sample = 8  # pool_token_codes on the synthetic source
  analysis.token_noise = 0.05
  analysis.bridge_reduction = "diag"  # diag | row | col | sym (= attribution) | max (needs blockwise B)
  analysis.modality_reverse = False  # False: 1 = text-only (paper); True: 1 = image-only
  analysis.top_fraction = 0.01  # top sets S_E, S_A, S_B: ceil(fraction * c) concepts
  analysis.top_pairs = 100  # top bridge pairs (blockwise B); 0 = skip B
  analysis.bridge_tile = 1024  # concept rows per B tile
  analysis.block_size = 4096  # pairs per streamed block
  analysis.compute_dtype = "float32"  # "bfloat16": gather/GEMM in bf16, float32 sums
  analysis.save_codes = False
  analysis.compare_workdirs = ""  # comma-separated workdirs (with analysis/) shown side by side
  analysis.run_name = ""  # label in tables and figures; "" = workdir basename
  analysis.match_threshold = 0.8  # synthetic: cosine for matching learned to planted concepts
  analysis.log_every_s = 60.0  # stderr not a terminal: a progress line over the blocks of codes this often
  return analysis


def concepts_section() -> ml_collections.ConfigDict:
  """`config.concepts`: experiments.concepts (the concept browser: index, cards, labels; pairs and
  sets as in `config.analysis`)."""
  concepts = ml_collections.ConfigDict()
  concepts.sae_workdir = ""  # SAE whose concepts are shown; "" = analysis.sae_workdir, else this workdir
  concepts.n_top = 8  # top-activating images and captions per card
  concepts.n_near = 5  # nearest concepts by decoder cosine per card
  concepts.hist_bins = 30  # bins of a card's activation histograms
  concepts.thumb_size = 64  # thumbnail side in pixels
  concepts.extra_ids = ""  # comma-separated concept ids carded besides S_E, S_A, S_B and the removed set
  concepts.min_auroc = 0.75  # below this best AUROC a concept is "unlabelled"
  concepts.content_free_rate = 0.9  # content-free: fires on at least this share of both modalities' rows
  concepts.negatives_draws = 1  # A- (attribution on unmatched pairs): seeded derangements averaged
  concepts.negatives_seed = 0
  concepts.block_size = 4096  # rows per encoded code block
  concepts.coco_json = ""  # COCO-style captions json whose "images" name the image files ("" = no thumbnails)
  concepts.image_root = ""  # folder of those files; "" = <folder of coco_json>/images
  return concepts


def retrieval_section() -> ml_collections.ConfigDict:
  """`config.retrieval`: experiments.retrieve (Recall@K, the removal and its baselines)."""
  retrieval = ml_collections.ConfigDict()
  retrieval.sae_workdir = ""
  retrieval.source = "auto"  # "auto" (pooled files if present, else synthetic) | "pooled" | "synthetic"
  retrieval.pooled_dir = ""  # "" = <workdir>/activations (pooled_<variant>.npz)
  retrieval.variants = ("mean", "last_token", "mean_no_image", "mean_no_prompt")
  retrieval.tasks = (
    "image_to_text",
    "text_to_image",
    "image_to_image",
    "image_text_to_image",
    "image_text_to_image_text",
  )  # tasks the inputs cannot provide are skipped
  retrieval.ks = (1, 5, 10)
  retrieval.max_queries = 0  # queries per task (paper Table 2: 3000); 0 = all
  # "all" | "first" (first max_queries, whole pool) | "random_restrict_pool" (max_queries random
  # queries, pool cut to their positives: the authors' sampler) | "one_to_one" (plus first positive only)
  retrieval.subset = "first"
  retrieval.subset_seed = 42  # random subsets: np.random.seed(subset_seed), as the authors
  retrieval.denominator = "all_queries"  # "all_queries" (no positive in the pool = miss) | "scorable"
  retrieval.split = "train"  # scored pooled files: "train" (<activations>/) | "eval" (<activations>/eval/)
  retrieval.fit_on = "auto"  # removal fit pairs: "train" split | "eval" (scored pairs) | "auto" (train if
  # split="eval" or fit_file is set, separate pairs on the synthetic source, else eval)
  # The training split's pooled file of the base variant when it lives elsewhere than
  # <pooled_dir>/pooled_<base_variant>.npz (the study: the train extraction's); "" = there.
  retrieval.fit_file = ""
  retrieval.base_variant = "mean"  # the variant removal / whitening are applied to
  retrieval.mbeir_task = "auto"  # task of an M-BEIR extraction in activations/ ("auto": from modalities)
  retrieval.exclude_reference = True  # CIRR: drop each query's own reference image
  retrieval.removal = True
  retrieval.attribution = "auto"  # "auto" (analysis/concepts.npz, else the SAE) | "concepts" | "sae"
  retrieval.removal_fraction = 0.01  # top fraction of concepts by attribution (paper: 1%)
  retrieval.removal_rank = -1  # r right singular vectors removed; -1 = all selected atoms
  # Top concepts by "attribution" (paper Eq. 6) | "energy" | "abs_attribution" | "negatives" (Eq. 6 over
  # unmatched pairs) | "margin" (2 negatives - attribution); README, equation table.
  retrieval.removal_by = "attribution"
  retrieval.removal_compare = ()  # other removal_by rules scored and swept beside it (model presets: all)
  retrieval.negatives_draws = 4  # seeded derangements of the fit pairs the unmatched-pair rules average
  retrieval.negatives_seed = 0
  # "none": removal_fraction / removal_rank as set | "validation": rule (removal_by + removal_compare),
  # fraction and rank, and all-but-the-top's D, chosen by R@1 on a split disjoint by image from the
  # scored one (the fit split where one exists, else validation_fraction of the scored images, left out).
  retrieval.select_on = "none"
  retrieval.select_how = "one_se"  # "best" R@1 | "one_se": the least removed within 1 s.e. of the best
  retrieval.select_fractions = (0.005, 0.01, 0.02, 0.05)
  retrieval.select_ranks = (1, 2, 4, 8, 16, 32, -1)  # -1 = every selected atom
  retrieval.validation_fraction = 0.2
  retrieval.validation_seed = 0
  retrieval.validation_max_pairs = 5000  # seeded subset of the validation pairs (0 = all)
  retrieval.abtt = True  # baselines: mean-centring (+center) and all-but-the-top (+abtt, needs validation)
  retrieval.abtt_components = (1, 2, 4, 8, 16)  # D candidates of all-but-the-top
  retrieval.bootstrap_n = 1000  # resamples of the Recall@K intervals (R@K_ci95, delta_vs_base)
  retrieval.bootstrap_seed = 0
  retrieval.sweep_task = "image_to_text"
  retrieval.sweep_ranks = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  retrieval.whitening = True  # shrinkage-whitening baseline on the base variant
  retrieval.whitening_alpha = 0.1
  retrieval.whitening_mode = "realign"  # "realign" (per side, normalised, own mean/cov) | "joint" (one fit)
  retrieval.save_embeddings = False
  retrieval.block_size = 8192  # candidates per GEMM block of the exact top-K search
  retrieval.query_block_size = 1024
  retrieval.synthetic_pairs = 2000  # source="synthetic": evaluation pairs
  retrieval.synthetic_fit_pairs = 2000  # separate pairs the attribution is computed on
  retrieval.synthetic_seed = 1
  retrieval.log_every_s = 60.0  # stderr not a terminal: a progress line over the scored settings this often
  return retrieval


def extract_section() -> ml_collections.ConfigDict:
  """`config.extract`: experiments.extract (model activations, shards and pooled files)."""
  extract = ml_collections.ConfigDict()  # experiments.extract (sae_jax/stages/extract.py)
  extract.model_name = ""  # hub id, local directory, or "tiny:<family>" (offline random weights)
  extract.family = ""  # "" = infer from the model config; clip|siglip|qwen_vl|paligemma|chameleon|text
  extract.layer = -1  # hidden_states index (-1 = last layer)
  extract.device = "auto"  # "auto" (cuda:<local rank> if available) | "cpu" | "cuda:0"
  extract.dtype = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
  extract.tiny_scale = 1  # width multiplier of tiny:<family> models
  extract.dataset = "coco"  # "coco" (official JSON) | "karpathy" | "parquet" | "tfds" | "mbeir"
  extract.captions_json = ""  # coco: captions_<split>.json
  extract.image_dir = ""  # coco/karpathy: image directory
  extract.karpathy_json = ""  # karpathy: dataset_coco.json
  extract.karpathy_split = "test"
  extract.parquet_files = ""  # parquet: glob of lmms-lab/COCO-Caption style files
  extract.tfds_name = "coco_captions"  # tfds: a dataset with the coco_captions features (the `tfds` extra)
  extract.tfds_split = "train"  # tfds: split (coco_captions: train | val | test | restval, Karpathy's)
  extract.tfds_data_dir = ""  # tfds: data directory, local or gs://; "" = the tfds default
  extract.mbeir_queries = ""  # mbeir: query jsonl
  extract.mbeir_pool = ""  # mbeir: candidate pool jsonl
  extract.mbeir_image_root = ""  # mbeir: root the jsonl image paths are relative to
  extract.mbeir_parquet_dir = ""  # mbeir: query-/corpus-/qrels-*.parquet (the authors' layout), not jsonl
  extract.max_images = 0  # 0 = all
  extract.captions_per_image = 0  # first N captions of each image; 0 = all
  # The evaluation split: pooled embeddings only, in <workdir>/activations/eval/ (retrieval.split="eval").
  extract.eval_dataset = ""  # "" = none | "karpathy" (paper: the 5k test split) | "coco" | "parquet" | "tfds"
  extract.eval_captions_json = ""  # eval_dataset="coco"
  extract.eval_image_dir = ""
  extract.eval_karpathy_split = "test"  # eval_dataset="karpathy" (reads extract.karpathy_json)
  extract.eval_tfds_split = "test"  # eval_dataset="tfds" (reads extract.tfds_name / tfds_data_dir)
  extract.eval_captions_per_image = 5  # the 5k protocol: 5 captions per image (a few have 6-7)
  extract.eval_max_images = 0  # 0 = all
  extract.pairing = "all"  # pooled rows: "all" (one per image-caption pair) | "first" (first caption)
  extract.pooling = ("mean",)  # mean | last_token | mean_no_image | mean_no_prompt | embed (contrastive)
  extract.templates = ml_collections.ConfigDict(
    {  # decoder prompts; {image} / {text} placeholders
      "image": "{image} Summarize the above image in one word:",
      "text": "{text} Summarize the above sentence in one word:",
      "pair": "{image} {text} Summarize the above image and sentence in one word:",
    }
  )
  extract.chat_template = False  # decoders: prompts inside the family's chat format (scaffold typed special)
  extract.contrastive_tokens = False  # clip/siglip: also return tower token states (for mean/last)
  extract.write_shards = True  # token-level training shards under <workdir>/activations/shards
  extract.shard_token_types = ("special", "image", "text", "prompt")  # which token rows to keep
  extract.shard_rows = "tokens"  # "tokens" (one row per kept token) | "pooled" (one row per sample: its
  # pooling[0] vector; like-for-like rows for an SAE applied to pooled embeddings); shards and online alike
  extract.shard_dtype = "float32"
  extract.rows_per_shard = 65536
  extract.batch_size = 8  # samples per forward pass
  extract.chunk_size = 256  # samples per resumable unit (part file)
  extract.num_workers = 4  # image decoding threads
  extract.log_every_s = 10.0  # progress line period
  extract.process_index = 0  # with process_count > 0: this process's part (sae_jax/stages/extract_parts.py)
  extract.process_count = 0  # 0 = from $RANK/$WORLD_SIZE, $SLURM_PROCID/$SLURM_NTASKS, Open MPI, else 1
  extract.online_buffer_batches = 8  # data.source="online": shuffle window, in SAE batches
  extract.online_window_items = 0  # data.source="online": samples encoded per window; 0 = sized from
  # online_buffer_batches and a probe of rows per sample
  return extract

"""Retrieval task definitions and the builders that turn embedding files into (queries, candidates,
positives) triples.

Tasks. The paper names them by dataset and modality; two numberings are in use and both are
recorded (`uniir_task`: M-BEIR / UniIR, 0 q_t->c_i ... 8 (q_i,q_t)->(c_i,c_t); `authors_task`: the
paper authors' loader, 1 t2i, 2 t2t, 3 t2it, 4 i2t, 5 i2i, 6 it2t, 7 it2i, 8 it2it):
                                                        UniIR  authors
  image_to_text             q_i -> c_t          MSCOCO  3      4        (paper Table 2, Table 3)
  text_to_image             q_t -> c_i          MSCOCO  0      1
  image_to_image            q_i -> c_i          NIGHTS  4      5        (Table 3)
  image_text_to_image       (q_i, q_t) -> c_i   CIRR    7      7        (Table 3, Figure 4; the query's
                                                                         own reference image is excluded
                                                                         by default, the authors keep it)
  image_text_to_image_text  (q_i, q_t) -> (c_i, c_t)  OVEN  8  8        (Figure 4)

Two input layouts are understood (both are `.npz` files, one per pooling variant):
  paired     `image` [N, d], `text` [N, d], optional `sample_ids` [N] (and `image_ids` [N]): row n
             of `image` and `text` describe the same sample. image_to_text / text_to_image are
             derived from it; rows sharing an image id are one image with several captions, so a
             query can have several positives.
  explicit   per task `<task>__queries` [Nq, d], `<task>__candidates` [Nc, d],
             `<task>__positives_indptr` [Nq+1], `<task>__positives_indices` [P] and optionally
             `<task>__exclude` [Nq] (candidate id to drop per query, -1 for none). Any task, e.g.
             the joint (image, text) embeddings of CIRR / OVEN written by the extraction stage.
             The `embeddings_<task>_<variant>.npz` files this package writes (`queries`,
             `candidates`, `positives_indptr`, `positives_indices`) are read back the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

from sae_jax.errors import SaeJaxError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  mbeir_task: int  # M-BEIR / UniIR task id
  query: str  # modality of the query: "image", "text", "image+text"
  candidate: str  # modality of the candidates
  dataset: str  # the dataset the paper uses for it
  exclude_reference: bool = False  # drop each query's own reference candidate (CIRR)
  authors_task: int = 0  # the paper authors' loader numbering (1 t2i ... 8 it2it)

  @property
  def label(self) -> str:
    fmt = lambda m: {"image": "q_i", "text": "q_t", "image+text": "(q_i,q_t)"}[m]
    cand = lambda m: {"image": "c_i", "text": "c_t", "image+text": "(c_i,c_t)"}[m]
    return f"{self.dataset} {fmt(self.query)}->{cand(self.candidate)}"


TASKS: dict[str, TaskSpec] = {
  "image_to_text": TaskSpec("image_to_text", 3, "image", "text", "MSCOCO", authors_task=4),
  "text_to_image": TaskSpec("text_to_image", 0, "text", "image", "MSCOCO", authors_task=1),
  "image_to_image": TaskSpec("image_to_image", 4, "image", "image", "NIGHTS", authors_task=5),
  "image_text_to_image": TaskSpec(
    "image_text_to_image", 7, "image+text", "image", "CIRR", exclude_reference=True, authors_task=7
  ),
  "image_text_to_image_text": TaskSpec(
    "image_text_to_image_text", 8, "image+text", "image+text", "OVEN", authors_task=8
  ),
}
PAIRED_TASKS = ("image_to_text", "text_to_image")

# How a task's queries are subsampled (`TaskData.subset`, config.retrieval.subset):
#   all                   every query, the whole pool
#   first                 the first `max_queries` queries, the whole pool
#   random_restrict_pool  `max_queries` random queries (np.random.seed(subset_seed) + choice without
#                         replacement), the pool cut to those queries' positives (the authors'
#                         `sample_dataset`, behind the paper's Table 2)
#   one_to_one            as random_restrict_pool, then only each query's first positive, and a
#                         query whose first positive is already taken by an earlier one is dropped
#                         (the authors' `sample_dataset_one_to_one`)
SUBSET_MODES = ("all", "first", "random_restrict_pool", "one_to_one")
EXPLICIT_KEYS = ("queries", "candidates", "positives_indptr", "positives_indices")


def get_task(name: str) -> TaskSpec:
  if name not in TASKS:
    raise SaeJaxError(f"config.retrieval.tasks: unknown task {name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name]


@dataclasses.dataclass
class TaskData:
  """Everything one Recall@K evaluation needs; positives are CSR over candidate ids."""

  queries: np.ndarray  # [Nq, d]
  candidates: np.ndarray  # [Nc, d]
  positives_indptr: np.ndarray  # [Nq + 1] int64
  positives_indices: np.ndarray  # [P] int64
  exclude: Optional[np.ndarray] = None  # [Nq] int64, -1 = none

  @property
  def n_queries(self) -> int:
    return int(self.queries.shape[0])

  @property
  def n_candidates(self) -> int:
    return int(self.candidates.shape[0])

  @property
  def n_unscorable(self) -> int:
    """Queries without any positive in the pool (misses when the denominator is every query)."""
    return int(np.sum(np.diff(self.positives_indptr) == 0))

  def subset(self, max_queries: int, mode: str = "first", seed: int = 42) -> "TaskData":
    """A query subset (see `SUBSET_MODES`); 0 = every query (the pool may still be restricted)."""
    if mode not in SUBSET_MODES:
      raise SaeJaxError(f"config.retrieval.subset={mode!r}: expected one of {SUBSET_MODES}")
    if max_queries < 0:
      raise SaeJaxError(f"config.retrieval.max_queries={max_queries}: expected >= 0 (0 = all)")
    n = self.n_queries if not max_queries else min(int(max_queries), self.n_queries)
    if mode == "all" or (mode == "first" and n == self.n_queries):
      return self
    if mode == "first":
      end = int(self.positives_indptr[n])
      return TaskData(
        self.queries[:n],
        self.candidates,
        self.positives_indptr[: n + 1].copy(),
        self.positives_indices[:end].copy(),
        None if self.exclude is None else self.exclude[:n].copy(),
      )
    # The authors' sampler: np.random.seed(seed); np.random.choice(query ids, n, replace=False),
    # queries kept in their original order (pandas `isin`).
    picked = np.zeros(self.n_queries, bool)
    picked[np.random.RandomState(int(seed)).choice(self.n_queries, size=n, replace=False)] = True
    rows = np.flatnonzero(picked)
    starts, ends = self.positives_indptr[rows], self.positives_indptr[rows + 1]
    if mode == "one_to_one":
      # First positive of each query; a query whose first positive an earlier query already holds
      # is dropped (the authors' drop_duplicates on the corpus id).
      has = ends > starts
      rows, starts = rows[has], starts[has]
      first = self.positives_indices[starts]
      _, keep = np.unique(first, return_index=True)
      keep = np.sort(keep)
      rows, first = rows[keep], first[keep]
      pos_lists = [first[i : i + 1] for i in range(rows.size)]
    else:
      pos_lists = [self.positives_indices[a:b] for a, b in zip(starts, ends)]
    # The pool: the candidates that are a positive of a kept query, in their original order.
    pool = np.unique(np.concatenate(pos_lists)) if pos_lists else np.zeros(0, np.int64)
    new_id = np.full(self.n_candidates, -1, np.int64)
    new_id[pool] = np.arange(pool.size)
    counts = np.asarray([p.size for p in pos_lists], np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = new_id[np.concatenate(pos_lists)] if pos_lists else np.zeros(0, np.int64)
    exclude = None
    if self.exclude is not None:
      ex = self.exclude[rows]
      exclude = np.where(ex >= 0, new_id[np.maximum(ex, 0)], -1)
    return TaskData(self.queries[rows], self.candidates[pool], indptr, np.asarray(indices, np.int64), exclude)

  def scorable(self) -> "TaskData":
    """The queries that have at least one positive (all candidates kept)."""
    rows = np.flatnonzero(np.diff(self.positives_indptr) > 0)
    if rows.size == self.n_queries:
      return self
    counts = np.diff(self.positives_indptr)[rows]
    indices = np.concatenate(
      [self.positives_indices[self.positives_indptr[r] : self.positives_indptr[r + 1]] for r in rows]
    )
    return TaskData(
      self.queries[rows],
      self.candidates,
      np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
      np.asarray(indices, np.int64),
      None if self.exclude is None else self.exclude[rows].copy(),
    )

  def map(self, fn) -> "TaskData":
    """The same task with `fn` applied to queries and candidates (e.g. a projector)."""
    return dataclasses.replace(self, queries=fn(self.queries), candidates=fn(self.candidates))


def csr_from_groups(query_groups: np.ndarray, candidate_groups: np.ndarray):
  """Positives of each query = the candidates with the same group id. Returns (indptr, indices)."""
  query_groups = np.asarray(query_groups)
  candidate_groups = np.asarray(candidate_groups)
  order = np.argsort(candidate_groups, kind="stable")
  sorted_groups = candidate_groups[order]
  lo = np.searchsorted(sorted_groups, query_groups, side="left")
  hi = np.searchsorted(sorted_groups, query_groups, side="right")
  counts = hi - lo
  indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  indices = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(lo) else np.zeros(0)
  return indptr, np.asarray(indices, np.int64)


def paired_task(
  name: str, image: np.ndarray, text: np.ndarray, image_ids: Optional[np.ndarray] = None
) -> TaskData:
  """image_to_text or text_to_image from matched rows; rows with equal image id share one image."""
  image = np.asarray(image, np.float32)
  text = np.asarray(text, np.float32)
  if image.ndim != 2 or text.ndim != 2 or image.shape[0] != text.shape[0]:
    raise SaeJaxError(
      f"paired embeddings: expected image [N, d] and text [N, d] with the same N, "
      f"got {image.shape} and {text.shape}"
    )
  n = image.shape[0]
  ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
  if ids.shape != (n,):
    raise SaeJaxError(f"image_ids / sample_ids: expected shape ({n},), got {ids.shape}")
  uniq, first = np.unique(ids, return_index=True)
  first = np.sort(first)  # unique images in order of first appearance
  img_ids = ids[first]
  if name == "image_to_text":
    indptr, indices = csr_from_groups(img_ids, ids)
    return TaskData(image[first], text, indptr, indices)
  if name == "text_to_image":
    indptr, indices = csr_from_groups(ids, img_ids)
    return TaskData(text, image[first], indptr, indices)
  raise SaeJaxError(
    f"task {name!r} cannot be built from paired image/text embeddings; "
    f'write explicit "{name}__queries" etc. arrays instead'
  )


def has_explicit(arrays: Mapping[str, np.ndarray], name: str) -> bool:
  return all(f"{name}__{k}" in arrays for k in EXPLICIT_KEYS)


def explicit_task(arrays: Mapping[str, np.ndarray], name: str, source: str = "") -> TaskData:
  """A task stored as `<name>__queries` etc. (or bare `queries` etc. when name is '')."""
  pre = f"{name}__" if name else ""
  missing = [pre + k for k in EXPLICIT_KEYS if pre + k not in arrays]
  if missing:
    raise SaeJaxError(f"{source or 'embeddings'}: missing {', '.join(missing)} for task {name!r}")
  ex = arrays.get(pre + "exclude")
  return TaskData(
    np.asarray(arrays[pre + "queries"], np.float32),
    np.asarray(arrays[pre + "candidates"], np.float32),
    np.asarray(arrays[pre + "positives_indptr"], np.int64),
    np.asarray(arrays[pre + "positives_indices"], np.int64),
    None if ex is None else np.asarray(ex, np.int64),
  )


def build_task(name: str, arrays: Mapping[str, np.ndarray], source: str = "") -> Optional[TaskData]:
  """The task from one variant's arrays, or None when the arrays cannot provide it."""
  get_task(name)
  if has_explicit(arrays, name):
    return explicit_task(arrays, name, source)
  if name in PAIRED_TASKS and "image" in arrays and "text" in arrays:
    ids = arrays.get("image_ids", arrays.get("sample_ids"))
    return paired_task(name, arrays["image"], arrays["text"], ids)
  return None


# ------------------------------------------------------------------------------- M-BEIR files

_MODALITY = {"image": "image", "text": "text", "image,text": "image+text"}


def mbeir_task_arrays(
  queries: Mapping[str, np.ndarray],
  pool: Mapping[str, np.ndarray],
  qrels: Mapping[str, list],
  task: str = "auto",
  source: str = "mbeir",
  keep_unscorable: bool = False,
) -> dict:
  """Explicit `<task>__*` arrays from the M-BEIR extraction output (`sae_jax.data.mbeir`).

  `queries` / `pool` are the arrays of `mbeir_{queries,pool}_pooled_<variant>.npz` (`embeddings`,
  `ids`, `modality`, `image_paths`), `qrels` maps a query id to its positive candidate ids. The task
  is inferred from the query and candidate modalities unless named. Queries whose positives all
  fell out of the pool (missing images) are dropped, as they cannot be scored, unless
  `keep_unscorable` (they stay, with no positive, and count as misses: the authors' denominator
  is every sampled query). For CIRR-style tasks
  the candidate holding the query's own image (same path) is excluded.
  """
  q_mod = sorted({_MODALITY[str(m)] for m in queries["modality"]})
  c_mod = sorted({_MODALITY[str(m)] for m in pool["modality"]})
  if task == "auto":
    found = [t.name for t in TASKS.values() if [t.query] == q_mod and [t.candidate] == c_mod]
    if not found:
      raise SaeJaxError(
        f"{source}: queries of modality {q_mod} against candidates {c_mod} match no task "
        f"in {sorted(TASKS)}; set config.retrieval.mbeir_task"
      )
    task = found[0]
  spec = get_task(task)
  position = {str(did): j for j, did in enumerate(pool["ids"])}
  keep, indptr, indices = [], [0], []
  for i, qid in enumerate(queries["ids"]):
    pos = sorted({position[str(d)] for d in qrels.get(str(qid), []) if str(d) in position})
    if pos or keep_unscorable:
      keep.append(i)
      indices.extend(pos)
      indptr.append(len(indices))
  if not indices:
    raise SaeJaxError(f"{source}: no query has a positive candidate in the pool (qrels vs pool ids)")
  keep = np.asarray(keep)
  out = {
    f"{task}__queries": np.asarray(queries["embeddings"], np.float32)[keep],
    f"{task}__candidates": np.asarray(pool["embeddings"], np.float32),
    f"{task}__positives_indptr": np.asarray(indptr, np.int64),
    f"{task}__positives_indices": np.asarray(indices, np.int64),
  }
  if spec.exclude_reference and "image_paths" in queries and "image_paths" in pool:
    by_path = {}
    for j, (p, m) in enumerate(zip(pool["image_paths"], pool["modality"])):
      if p and str(m) == "image":
        by_path.setdefault(str(p), j)
    out[f"{task}__exclude"] = np.asarray(
      [by_path.get(str(queries["image_paths"][i]), -1) for i in keep], np.int64
    )
  return out

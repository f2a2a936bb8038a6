"""The data pipeline: tracklet table, P×K identity sampler, clip sampling, DALI and torch loaders (design §1).

Imports DALI only when a DALI loader is built, so the torch backend works where DALI is not installed.
May import: the shared top-level modules (stenvan.shards, .lock, ...); never the models, evaluation or training.
"""

from stenvan.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from stenvan.data.sampling import (Augment, ClipSpec, IdentitySampler, TrainPlan, dense_chunks, eval_clips,
                                   first_of_chunk_indices, restricted_random_indices)
from stenvan.data.table import FrameStore, ShardChangedError, Tracklet, TrackletTable

__all__ = ["Augment", "ClipSpec", "EvalLoader", "FrameStore", "IdentitySampler", "ShardChangedError",
           "TrainLoader", "TrainPlan", "Tracklet", "TrackletTable", "build_eval_loader", "build_train_loader",
           "dense_chunks", "eval_clips", "first_of_chunk_indices", "restricted_random_indices"]

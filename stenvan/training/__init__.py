"""The training run: `Trainer` (trainer.py) and everything only it uses.

What a run needs beside its loop: the losses and the optimizer step (losses, optim, schedule), numbers kept on the
device between sync points (step_meter) and their two log streams (runlog), checkpoints written off the critical
path (checkpoint_writer), the run folder's claim (run_folder), the resume decision and what a resume must keep
(resume, resume_checks), every RNG of the run (rng), and failures that stop every rank together (failures).

May import: the shared top-level modules (stenvan.config, .distributed, .checkpoint, .shards, .lock, .errors,
.amp), stenvan.models, stenvan.data and stenvan.evaluation (the evaluation during training). Nothing imports it
but train.py, the benchmarks and the tests.
"""

"""prepare: dataset folders (MARS, DukeV, synthetic) → verified WebDataset shards. See `python -m prepare -h`."""

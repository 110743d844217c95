"""Training: the in-context teacher, in-context teacher forcing and gradient-reweighted DMD (docs/method.md §2-§5).

`config` (dataclass configs, YAML/JSON loading), `data` (triplets, latent cache), `flow` (flow-matching table),
`losses` (one loss object per stage), `reward` (GR-DMD's rewards, chunk weights), `trainer` (the one skeleton),
`recipe` (all three stages from one file). How to run it: the "Training" section of the project README.
"""

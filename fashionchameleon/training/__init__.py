"""Training: the in-context teacher, in-context teacher forcing and gradient-reweighted DMD (METHOD.md §2-§5).

`config` (dataclass configs, YAML/JSON loading), `data` (triplets, latent cache), `flow` (flow-matching table),
`losses` (one loss object per stage), `reward` (aesthetic reward, chunk weights), `trainer` (the one skeleton),
`toydata` (a procedural toy dataset for the tiny configs). How to run it: README.md beside this file.
"""

"""The paper's clinical applications as commands.

hagan-embed (encoder embeddings of real volumes), hagan-regress (Ridge from embeddings to a
measurement), hagan-directions (walk a latent direction that changes a measurement) and
hagan-augment (class-conditional samples as extra classifier training data).
"""

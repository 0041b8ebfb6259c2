"""vitexp: reproduce the inductive-bias studies of ViT (data-size scaling) and
Early Convolutions (conv-stem stability) from one command line."""

__version__ = "0.1.0"

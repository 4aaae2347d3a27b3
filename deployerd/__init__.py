"""deployerd: a GitOps deployment daemon for servers reached over SSH."""

__version__ = "0.1.0"

"""herd_trio: an application server herd on trio (the classic proxy-herd protocol)."""

__version__ = "0.1.0"

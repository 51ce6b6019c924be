"""The bottom layer: file helpers, the cache folder and constants, importing nothing of the package."""

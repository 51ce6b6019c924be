"""Building blocks of the PVT backbones (``blocks``) and the fused oneDNN inference kernels (``fused``)."""

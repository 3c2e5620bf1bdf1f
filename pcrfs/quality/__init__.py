"""Choosing the fidelity: image quality per scan group and per-image adaptive views.

* :mod:`.msssim` - MS-SSIM and PSNR on luminance (numpy, scipy when present);
* :mod:`.measure` - decoding every fidelity of an image and scoring it against
  the full decode; the per-k quality table of a sample and target selection;
* :mod:`.scoring` - the optional per-image k index behind the ``ssimNN`` views
  (computing, writing atomically, loading and checking it);
* :mod:`.plot` - the quality-against-bytes plot.
"""

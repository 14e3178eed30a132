"""Latent caching: encode an image dataset once into latent shards plus an index, resumably and in parallel.

- :mod:`klvae.cache.sources`: the dataset (a folder of images, or webdataset-layout tar shards) as samples.
- :mod:`klvae.cache.buckets`: aspect-ratio/resolution buckets and the resize-and-crop into them.
- :mod:`klvae.cache.shards`: shard files (safetensors), the done-set a restart skips, and the merged index.
- :mod:`klvae.cache.settings`: :class:`CacheSettings`, the options of a run (imports nothing heavy).
- :mod:`klvae.cache.pipeline`: ``run_cache``: rank slicing, parallel loading, bucketed batches, encoding, shards.
"""

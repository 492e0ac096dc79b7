"""The napari plugin (``pip install meunet[napari]``; manifest ``napari.yaml``).

- :mod:`._reader`: every volume format meunet reads, lazily (dask) where the format allows, OME-Zarr
  pyramids as multiscale layers, label volumes as Labels layers with meunet's class colours.
- :mod:`._writer`: Labels layers to any format meunet writes.
- :mod:`._widgets`: "Segment with meunet" and "Evaluate labels".
- :mod:`._sample`: a synthetic fly and its labels.
"""

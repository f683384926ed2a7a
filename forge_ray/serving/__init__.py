"""Using a trained GR model: the in-process :class:`Recommender`, SIDs for new items.

Nothing here imports Ray; the Ray Serve deployment is :mod:`forge_ray.distributed.serve`.
"""

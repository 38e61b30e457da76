"""kruising's merger: recipes -> plan -> streamed tensor merges -> child folders.

``core`` merges (recipe, plan, methods, kernels, shard I/O, engine, child folder), ``study``
sweeps and ranks variants, ``share`` writes model cards and talks to the Hub; ``cli`` and
``demo`` sit on top. Importing any of it changes no process state.
"""

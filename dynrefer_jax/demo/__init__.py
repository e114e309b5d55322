r"""A web demo: upload an image (or pick a synthetic one), draw boxes, read what DynRefer says.

  python -m dynrefer_jax.demo --config configs/synthetic.py --checkpoint workdirs/synthetic \
      [--port 7860]

Serves one page on http://127.0.0.1:PORT/ (loopback only; --port 0 picks a free port and prints
it). The model is loaded and both predict paths (the pHash image prior, and fixed t values for
the task priors and manual t) are compiled once, before the address is printed. Per box the page
shows the caption and its confidence, the tags and attributes with their scores, the category and
the views the model looked at with their t. Everything is served from this package: no network.

`server.py` holds the model side (`Engine`) and the HTTP API; `static/` the page.
"""

from dynrefer_jax.demo.server import Engine, main, make_server  # noqa: F401

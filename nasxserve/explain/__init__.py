"""Turning prototype evidence into boxes and figures, and measuring what it is worth.

``consistency`` and ``figure`` are torch-free (numpy and Pillow), for inference; ``calibration``, ``metrics``
and ``evaluation`` run the PyTorch model and need the training extra. The box rule itself is
:mod:`nasxserve.boxes`, below every package that draws boxes (protos, runtime, serve, explain).
"""

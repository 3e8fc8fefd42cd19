"""Turning prototype evidence into boxes and figures, and measuring what it is worth.

``boxes`` and ``figure`` are torch-free (numpy and Pillow), for inference; ``metrics`` and ``evaluation``
run the PyTorch model and need the training extra.
"""

"""HTTP serving of a bundle: a BentoML service (adaptive batching, health, metrics) with a FastAPI app
for the image endpoints (multipart, raw body or base64 JSON in; evidence out). Never imports torch."""

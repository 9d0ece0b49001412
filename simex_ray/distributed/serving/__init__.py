"""Ray Serve adapter: per-member autoencoder deployments behind one FastAPI ingress."""

"""The names a user chooses from, free of torch, numpy and Ray: `simex` builds its parser (``--help``, argument
errors) from these without loading the libraries that compute, and each registry takes its names from here,
so every name is written once.

Where a registry maps a name to code (architectures, optimizers, transferability estimators), that registry
lives with its code and refuses or is checked against a name missing here (``tests/test_cli.py``).
"""

# Reconstruction error δ (:mod:`simex_ray.losses`).
LOSSES = ("mse", "issim")
# Where the autoencoders run (:func:`simex_ray.scoring.resolve_device`).
DEVICES = ("cpu", "cuda", "auto")
# Forward passes in fp32 or under bfloat16 autocast (:mod:`simex_ray.training`).
PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"
# Optimizers by name; :data:`simex_ray.training.OPTIMIZERS` gives each its class and default learning rate.
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd", "adagrad", "adadelta")
# Autoencoders by name; each is registered by its module in :mod:`simex_ray.models`.
ARCHITECTURES = ("conv", "lenet", "mlp")
# How `ranking` orders references (:mod:`simex_ray.fleet.result` says why): typicality_latent for a fleet whose
# members all have latent moments, distribution for any other (and the fallback of a ranking a member cannot
# take). docs/results.md, "Rankings that hold".
RANKINGS = ("raw", "normalized", "calibrated", "in_distribution", "typicality", "distribution", "typicality_latent")
DEFAULT_RANKING = "distribution"
LATENT_RANKING = "typicality_latent"
# `--epochs auto` (:func:`simex_ray.training.auto_stop_epoch`): train until the member's own held-out Δ stops
# improving. An epoch "improves" when its Δ is below (1 - AUTO_MIN_GAIN) x the best Δ before it; training stops
# after AUTO_PATIENCE epochs without one, or at AUTO_MAX_EPOCHS. Chosen a priori (the usual early-stopping
# shape), not fitted to any benchmark.
AUTO_PATIENCE = 3
AUTO_MIN_GAIN = 0.01
AUTO_MAX_EPOCHS = 30
# Reading a reference where it trains (:mod:`simex_ray.fleet.plan`).
STREAM_MODES = ("auto", "always", "never")
# A whole reference (no --samples) that can be read in slices is streamed where it trains once its training
# images would take more than this in memory (float32, the fleet's format); smaller ones are read here and
# can share fused passes. Both read the same rows: the split is the row-hash rule either way.
STREAM_BYTES = 1 << 28
# Class distances of `simex pair` (:mod:`simex_ray.pairing`).
PAIRING_METHODS = ("simex", "sample-mse", "embeddings")
# How a weight file in a classifier library becomes a network (simex_ray/transfer/zoo.py builds them).
CLASSIFIER_ARCHITECTURES = ("lenet5", "torchvision:<name>", "timm:<name>", "torchscript")
# Methods of `simex select`: simex, then the transferability estimators of :mod:`simex_ray.transfer.estimators`.
FEATURE_WHERE = ("auto", "here", "ray")  # where `simex select` computes the classifiers' outputs
FEATURE_BLOCK = 2048  # images per slice of Ray feature extraction

# The label-using estimators come first, then the label-free ones (LABEL_FREE_METHODS, with simex).
SELECTION_METHODS = ("simex", "logme", "leep", "nce", "hscore", "gbc", "knn", "sfda", "ncti", "parc", "transrate",
                     "nleep", "entropy", "nuclear-norm", "silhouette", "energy", "mano")
# Those of SELECTION_METHODS that need no labels (the registry's needs_labels agrees: tests/test_estimators.py).
LABEL_FREE_METHODS = ("simex", "entropy", "nuclear-norm", "silhouette", "energy", "mano")

# What a member trains with when nothing says otherwise: the defaults of ``training.TrainConfig`` and of
# `simex train`'s flags, written once. (The architecture's default depends on the format:
# ``models.default_architecture``.)
TRAIN_DEFAULTS = {"loss": "mse", "epochs": 10, "optimizer": "adam", "lr": None, "batch_size": 16}

# Serve layouts (:mod:`simex_ray.distributed.serving`): name -> what it is, for `--mode`'s help.
SERVE_MODES = {
    "members": "one application per member (scale members independently; for up to 64 members)",
    "fused": "one application holding the whole fleet (one hop past the ingress)",
    "embedded": "the ingress replicas hold the whole fleet (no hop past the proxy; --replicas and "
                "--cpus-per-replica size them)",
    "sharded": "the fleet in shard applications of K members each, asked at once and merged (large fleets)",
}
# The defaults of ``ServeSettings`` and of `simex serve`'s flags, written once.
SERVE_DEFAULTS = {"mode": "members", "replicas": 1, "cpus_per_replica": 0.25, "ingress_replicas": 1,
                  "gpus_per_replica": 0.0, "deploy_timeout_s": 600.0}

"""Training: search (DARTS, PC-DARTS, P-DARTS, LeaSE), retraining and ProtoPNet baselines, the run directory."""

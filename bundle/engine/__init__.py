"""Training: the method-agnostic trainer on ``monai.engines.SupervisedTrainer``, numeric precision, resume state,
multi-process training, ignite handlers, progress and process-level runtime settings."""

"""Semi-supervised methods: one plug-in class per method, all driven by :class:`bundle.engine.trainer.SSLTrainer`."""

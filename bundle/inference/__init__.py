"""Using a trained model: sliding-window inference over folders, the model's settings file, network optimisation,
uncertainty ranking of scans to label next, metrics with the papers' semantics, and evaluation reports."""

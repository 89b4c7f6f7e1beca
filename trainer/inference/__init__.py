"""The use of a trained model: loading a verified checkpoint (loading), eval and complete."""

"""Model side of UniMedVL: the pure-PyTorch engine, encoders, preprocessing, workers."""

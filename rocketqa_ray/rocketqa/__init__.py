"""The recipe's own logic, Ray-free: negatives, calibration (step 2), denoising (step 3), pseudo-labels (step 4)."""
